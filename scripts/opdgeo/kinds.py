"""The kinds of run, declared once: label, order in figures and tables, whether a run of the
kind needs a teacher, whether it is a control of OPD, and how it is trained.

opdgeo.config makes the runs, the rules wire their inputs, opdgeo.train picks the trainer, and
the figures, paper tables and findings group and label runs, all from this table. The
schema's enums (controls, sweep kinds, external kinds) are checked against it by a test.

To add a kind: declare it here, and give opdgeo.train its trainer: `trainer` names it, and
opdgeo.train.BUILDERS maps that name to the short function that builds it from a run.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RunKind:
    name: str
    label: str  # the method's name in legends and tables
    needs_teacher: bool  # trained against a teacher (its checkpoint is an input)
    is_control: bool  # made for a pair that lists it under pairs.<pair>.controls, matched to
    # OPD's seeds, optimizer, steps and batch
    trainer: str | None  # the trainer class opdgeo.train builds (TRL's, or OPDTrainer, TRL's
    # DistillationTrainer with the study's losses); None: given, not trained
    divergence: bool = False  # trained on the config's divergence (`training.loss`)
    # Its delta is compared across methods (Fig 1, trajectory, the matched-gain grid); masked
    # retrains are interventions instead, shown in Fig 3.
    delta_method: bool = True
    # The kind of training the paper contrasts OPD with, that runs of this kind stand for
    # (OFFLINE_DISTILLATION: F1's comparator and the paper's offline-distillation row; RLVR:
    # the paper's RLVR row and RLVR-mask arm); None for OPD and its interventions.
    role: str | None = None
    default_control: bool = True  # a control made when a pair lists no `controls`
    # Self-distillation: the teacher is the student's own model, scoring with a privileged
    # context in its prompt: the example's own (OWN) or another example's (OTHER); None: not
    # a self-distillation kind.
    privileged: str | None = None


OFFLINE_DISTILLATION, RLVR = "offline distillation", "RLVR"  # the roles of the controls
OWN, OTHER_EXAMPLE = "own", "other"  # whose privileged context a self-teacher reads

# In display order: controls and self-distillation first, then OPD and its interventions.
RUN_KINDS = {kind.name: kind for kind in (
    RunKind("sft", "offline distillation (SFT)", needs_teacher=True, is_control=True,
            trainer="SFTTrainer", role=OFFLINE_DISTILLATION),
    RunKind("grpo", "RLVR (GRPO)", needs_teacher=False, is_control=True,
            trainer="GRPOTrainer", role=RLVR),
    RunKind("opsd", "on-policy self-distillation (OPSD)", needs_teacher=False, is_control=True,
            trainer="OPSDTrainer", divergence=True, default_control=False, privileged=OWN),
    RunKind("op2sd", "OPSD, another example's context (OP2SD)", needs_teacher=False,
            is_control=True, trainer="OPSDTrainer", divergence=True, default_control=False,
            privileged=OTHER_EXAMPLE),
    RunKind("opd", "OPD", needs_teacher=True, is_control=False,
            trainer="OPDTrainer", divergence=True),
    RunKind("masked", "masked OPD", needs_teacher=True, is_control=False,
            trainer="OPDTrainer", divergence=True, delta_method=False),
    RunKind("external", "other", needs_teacher=False, is_control=False, trainer=None),
)}
# An external run is shown as the kind its config declares (external.<name>.kind), or "other".
OPD, MASKED, EXTERNAL, OTHER = "opd", "masked", "external", "other"
CONTROLS = tuple(k for k, kind in RUN_KINDS.items() if kind.is_control)
# The method of each role (an external run declares a method, so it takes its role too).
ROLE_METHOD = {kind.role: k for k, kind in RUN_KINDS.items() if kind.role}
DEFAULT_CONTROLS = tuple(k for k in CONTROLS if RUN_KINDS[k].default_control)
# Self-distillation with the example's own context, and its control with another's.
SELF_DISTILLATION = {kind.privileged: k for k, kind in RUN_KINDS.items() if kind.privileged}
SWEEP_KINDS = (OPD, *CONTROLS)  # the methods the matched-gain grid may train, in run order
DEFAULT_SWEEP_KINDS = (OPD, *DEFAULT_CONTROLS)
DELTA_KINDS = tuple(k for k, kind in RUN_KINDS.items() if kind.delta_method)
# Methods compared on a matched budget: trained, delta-compared (the sweep grid's kinds).
TRAINED_METHODS = tuple(k for k in DELTA_KINDS if RUN_KINDS[k].trainer)
# What an external run may declare itself: a method compared on its delta, or "other".
EXTERNAL_METHODS = tuple(k for k in DELTA_KINDS if k != EXTERNAL) + (OTHER,)
# Methods in display order (an external run takes its declared method).
METHOD_ORDER = tuple(k for k in RUN_KINDS if k != EXTERNAL) + (OTHER,)
METHOD_LABELS = {k: kind.label for k, kind in RUN_KINDS.items() if k != EXTERNAL} | {
    OTHER: RUN_KINDS[EXTERNAL].label}
