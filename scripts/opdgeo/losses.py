"""OPD loss variants that TRL's DistillationTrainer lacks, as a small subclass.

`reverse_kl`, `forward_kl` and `jsd` are TRL's own chunked generalised JSD (beta 1, 0, or the
configured mixing). Two more are public OPD practice:

- `sampled_k1` (verl, Tinker): per-token advantage A_t = -(log pi_S(y_t) - log pi_T(y_t)),
  detached; loss = -A_t * log pi_S(y_t), a policy gradient on the sampled tokens.
- `forward_kl_topk`: KL(pi_T || pi_S) over the teacher's top-k tokens, the teacher
  renormalised over them (the paper's vision-language run, k = 32).

Both take logits from the models' own forward, so architecture-specific logit scaling
(MiniCPM, Gemma soft-capping) is applied as the model defines it.
"""

import torch
import torch.nn.functional as F
import trl
from trl import DistillationTrainer

TRL_BETA = {"reverse_kl": 1.0, "forward_kl": 0.0}
# Image inputs that DistillationTrainer keeps beside the token ids of a vision-language batch;
# both models' forwards need them (the image tokens are placeholders for the vision tower).
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                "mm_token_type_ids", "token_type_ids")
LOSSES = ("reverse_kl", "forward_kl", "jsd", "sampled_k1", "forward_kl_topk")

# OPDTrainer overrides the method DistillationTrainer.compute_loss calls for the loss; were it
# renamed in a TRL release, sampled_k1 and forward_kl_topk would silently train with TRL's own
# loss. tests/test_train.py checks, by a spy, that the loss trained on is ours.
if not callable(getattr(DistillationTrainer, "_compute_loss", None)):
    raise ImportError(f"trl {trl.__version__}: DistillationTrainer has no _compute_loss, the "
                      "method OPDTrainer overrides; install the trl that envs/requirements.txt "
                      "pins")


def sampled_k1(student_logp, teacher_logp, completion_ids, topk):
    """Per-token -A_t * log pi_S(y_t), A_t = -(log pi_S(y_t) - log pi_T(y_t)) detached."""
    s = student_logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    t = teacher_logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    advantage = -(s - t).detach()
    return -advantage * s


def forward_kl_topk(student_logp, teacher_logp, completion_ids, topk):
    """Per-token KL(pi_T || pi_S) over the teacher's top-k tokens, the teacher renormalised."""
    top_logp, top_idx = teacher_logp.topk(min(topk, teacher_logp.size(-1)), dim=-1)
    top_p = F.softmax(top_logp, dim=-1)
    return (top_p * (top_p.clamp_min(1e-30).log() - student_logp.gather(-1, top_idx))).sum(-1)


# The losses OPDTrainer computes itself (the others are TRL's generalised JSD).
OWN_LOSSES = {"sampled_k1": sampled_k1, "forward_kl_topk": forward_kl_topk}


class OPDTrainer(DistillationTrainer):
    """DistillationTrainer with the sampled-token and top-k losses added."""

    def __init__(self, *args, loss: str = "reverse_kl", topk: int = 32, **kwargs):
        if loss not in LOSSES:
            raise ValueError(f"unknown OPD loss {loss!r}; choose one of {LOSSES}")
        super().__init__(*args, **kwargs)
        self.opd_loss, self.topk = loss, topk

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.opd_loss not in OWN_LOSSES:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"].float()
        student_logits = self._completion_logits(unwrapped_student, inputs)
        with torch.no_grad():
            self.teacher_model.eval()
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            teacher_logits = self._completion_logits(teacher, inputs)
        student_logp = F.log_softmax(student_logits / self.temperature, dim=-1)
        teacher_logp = F.log_softmax(teacher_logits / self.temperature, dim=-1)
        per_token = OWN_LOSSES[self.opd_loss](student_logp, teacher_logp, completion_ids,
                                              self.topk)
        total = (per_token * mask).sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        loss = total / torch.as_tensor(denominator, device=total.device).clamp_min(1)
        entropy = -(student_logp.exp() * student_logp).sum(-1)
        return loss, (entropy * mask).sum().detach(), mask.sum()

    @staticmethod
    def _completion_logits(model, inputs):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        k = inputs["completion_ids"].size(1)
        images = {key: inputs[key] for key in IMAGE_INPUTS if key in inputs}
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=k + 1, **images).logits
        return logits[:, :-1].float()  # position t predicts completion token t
