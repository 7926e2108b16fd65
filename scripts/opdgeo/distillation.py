"""The study's distillation trainers, small subclasses of TRL's DistillationTrainer:
`OPDTrainer`, with the OPD loss variants TRL lacks, and `OPSDTrainer`, on-policy
self-distillation.

`reverse_kl`, `forward_kl` and `jsd` are TRL's own chunked generalised JSD (beta 1, 0, or the
configured mixing). Two more are public OPD practice:

- `sampled_k1` (verl, Tinker): per-token advantage A_t = -(log pi_S(y_t) - log pi_T(y_t)),
  detached; loss = -A_t * log pi_S(y_t), a policy gradient on the sampled tokens.
- `forward_kl_topk`: KL(pi_T || pi_S) over the teacher's top-k tokens, the teacher
  renormalised over them (the paper's vision-language run, k = 32).

Both take logits from the models' own forward, so architecture-specific logit scaling
(MiniCPM, Gemma soft-capping) is applied as the model defines it. So does every loss when
its terms are capped (`kl_clip`: each (token, vocabulary entry) term of the divergence at
most that, before the sum over the vocabulary, as OPSD's per-token clipping) or when the
teacher reads another prompt than the student (`OPSDTrainer`); TRL's three divergences are
then computed here, term for term as TRL's generalised JSD.

`OPSDTrainer` is on-policy self-distillation ("Self-Distilled Reasoner", OPSD): the student
samples on the plain prompt, and its tokens are scored by a teacher that is its own model
(the frozen source, as OPSD's recommended fixed teacher, or the current weights) reading the
same prompt with a privileged context, the reference solution, in it. The teacher's prompt of
each row is its `teacher_prompt` column.
"""

import math

import torch
import torch.nn.functional as F
import trl
from trl import DistillationTrainer
from trl.trainer.utils import pad

TRL_BETA = {"reverse_kl": 1.0, "forward_kl": 0.0}
# Image inputs that DistillationTrainer keeps beside the token ids of a vision-language batch;
# both models' forwards need them (the image tokens are placeholders for the vision tower).
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                "mm_token_type_ids", "token_type_ids")
LOSSES = ("reverse_kl", "forward_kl", "jsd", "sampled_k1", "forward_kl_topk")
TEACHER_PROMPT = "teacher_prompt"  # the column (and, tokenised, the inputs) of OPSD's teacher

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


def forward_kl_topk(student_logp, teacher_logp, completion_ids, topk, clip=None):
    """Per-token KL(pi_T || pi_S) over the teacher's top-k tokens, the teacher renormalised."""
    top_logp, top_idx = teacher_logp.topk(min(topk, teacher_logp.size(-1)), dim=-1)
    top_p = F.softmax(top_logp, dim=-1)
    terms = top_p * (top_p.clamp_min(1e-30).log() - student_logp.gather(-1, top_idx))
    return _capped(terms, clip).sum(-1)


def generalized_jsd(student_logp, teacher_logp, beta: float, clip=None):
    """Per-token generalised JSD as TRL's DistillationTrainer defines it: beta 0 the forward
    KL(pi_T || pi_S), 1 the reverse KL(pi_S || pi_T), else beta KL(pi_T || m) +
    (1 - beta) KL(pi_S || m) with the mixture m = beta pi_T + (1 - beta) pi_S."""
    if beta == 0:
        terms = teacher_logp.exp() * (teacher_logp - student_logp)
    elif beta == 1:
        terms = student_logp.exp() * (student_logp - teacher_logp)
    else:
        mixture = torch.logaddexp(student_logp + math.log(1 - beta),
                                  teacher_logp + math.log(beta))
        terms = (beta * teacher_logp.exp() * (teacher_logp - mixture)
                 + (1 - beta) * student_logp.exp() * (student_logp - mixture))
    return _capped(terms, clip).sum(-1)


def _capped(terms, clip):
    return terms if clip is None else terms.clamp(max=clip)


# The losses OPDTrainer computes itself (the others are TRL's generalised JSD).
OWN_LOSSES = {"sampled_k1": sampled_k1, "forward_kl_topk": forward_kl_topk}


class OPDTrainer(DistillationTrainer):
    """DistillationTrainer with the sampled-token and top-k losses added, every loss's terms
    optionally capped (`kl_clip`), and the teacher's own prompt where the inputs carry one."""

    def __init__(self, *args, loss: str = "reverse_kl", topk: int = 32,
                 kl_clip: float | None = None, **kwargs):
        if loss not in LOSSES:
            raise ValueError(f"unknown OPD loss {loss!r}; choose one of {LOSSES}")
        if kl_clip is not None and loss == "sampled_k1":
            raise ValueError("kl_clip caps a divergence's terms; sampled_k1 has none")
        super().__init__(*args, **kwargs)
        self.opd_loss, self.topk, self.kl_clip = loss, topk, kl_clip

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        own_prompt = f"{TEACHER_PROMPT}_ids" in inputs
        if self.opd_loss not in OWN_LOSSES and self.kl_clip is None and not own_prompt:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"].float()
        student_logits = self._completion_logits(unwrapped_student, inputs)
        with torch.no_grad():
            # No teacher model: the teacher is the student's current weights (self-distillation).
            teacher = unwrapped_student if self.teacher_model is None \
                else self.accelerator.unwrap_model(self.teacher_model).eval()
            teacher_logits = self._completion_logits(teacher, inputs,
                                                     TEACHER_PROMPT if own_prompt else "prompt")
        student_logp = F.log_softmax(student_logits / self.temperature, dim=-1)
        teacher_logp = F.log_softmax(teacher_logits / self.temperature, dim=-1)
        if self.opd_loss == "sampled_k1":
            per_token = OWN_LOSSES["sampled_k1"](student_logp, teacher_logp, completion_ids,
                                                 self.topk)
        elif self.opd_loss == "forward_kl_topk":
            per_token = OWN_LOSSES["forward_kl_topk"](student_logp, teacher_logp,
                                                      completion_ids, self.topk, self.kl_clip)
        else:
            per_token = generalized_jsd(student_logp, teacher_logp, self.beta, self.kl_clip)
        total = (per_token * mask).sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        loss = total / torch.as_tensor(denominator, device=total.device).clamp_min(1)
        entropy = -(student_logp.exp() * student_logp).sum(-1)
        return loss, (entropy * mask).sum().detach(), mask.sum()

    @staticmethod
    def _completion_logits(model, inputs, prompt: str = "prompt"):
        """Logits predicting each completion token after `prompt`'s ids (the student's, or the
        teacher's own prompt)."""
        input_ids = torch.cat([inputs[f"{prompt}_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs[f"{prompt}_mask"], inputs["completion_mask"]], dim=1)
        k = inputs["completion_ids"].size(1)
        images = {key: inputs[key] for key in IMAGE_INPUTS if key in inputs}
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=k + 1, **images).logits
        return logits[:, :-1].float()  # position t predicts completion token t


class OPSDTrainer(OPDTrainer):
    """On-policy self-distillation: OPDTrainer whose teacher reads each row's
    `teacher_prompt` (the student's prompt with a privileged context in it) before the
    student's completion. `teacher_model` is the frozen source, or None for the current
    weights. Rollouts, batches and losses are OPD's."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        ids, _, _ = self._tokenize_prompts([row[TEACHER_PROMPT] for row in inputs])
        ids = [torch.tensor(row) for row in ids]
        pad_id = self._tokenizer.pad_token_id
        device = output["prompt_ids"].device
        output[f"{TEACHER_PROMPT}_ids"] = pad(ids, padding_value=pad_id,
                                              padding_side="left").to(device)
        output[f"{TEACHER_PROMPT}_mask"] = pad([torch.ones_like(row) for row in ids],
                                               padding_value=0, padding_side="left").to(device)
        return output
