"""Learning without Forgetting (Li & Hoiem 2016, "Learning without Forgetting"), for causal LMs.

Before each task the model is snapshotted as a frozen teacher. While training, the student's
next-token distribution on the current inputs is pulled towards the teacher's:

    weight * T^2 * KL( softmax(teacher / T) || softmax(student / T) )

averaged over the batch's non-pad positions. T > 1 softens both distributions so the whole
ranking of tokens is preserved, not only the top one; the T^2 factor keeps the gradient scale
independent of T (Hinton et al. 2015). No old data is needed: the current task's inputs carry
the old model's behaviour. It applies from the first task on, so the first task is also kept
close to the model it started from (the base / DAP model).

Memory: the teacher is a full deep copy of the model (including any adapters) on the same
device. It is rebuilt by before_task from the task-start model, so it is not part of state_dict:
on a resume the stage runner calls before_task with the task-start model again.

Under FSDP2 (a sharded model) there is no copy: the teacher is the model itself with its trained
parameters at their task-start values. before_task keeps those values as DTensors of this rank's
shard (1/W of the trained weights, frozen ones are shared), and each teacher forward swaps them in,
runs the sharded model under no_grad and swaps the student's values back, bit for bit, before any
backward reads them (`_sharded_teacher_logits`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from models.cl.base import CLPlugin, PluginState, TaskContext, local_part, reshard
from models.engine import is_sharded


class LwFPlugin(CLPlugin):
    name = "lwf"

    def __init__(self, weight: float = 1.0, temperature: float = 2.0, seed: int = 0):
        self.weight = weight
        self.temperature = temperature
        self.teacher: torch.nn.Module | None = None
        self.teacher_shards: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # FSDP2: (trained parameter, its start)

    def before_task(self, ctx: TaskContext) -> None:
        if is_sharded(ctx.model):
            with torch.no_grad():  # outside a forward pass, so these are the sharded parameters
                self.teacher_shards = [(p, p.detach().clone()) for p in ctx.model.parameters() if p.requires_grad]
        else:
            self.teacher = frozen_copy(ctx.model)

    def extra_loss(self, model, batch, outputs):
        if self.teacher is None and not self.teacher_shards:
            raise RuntimeError("LwF: before_task was not called, so there is no teacher model to distil from")
        if self.weight == 0:
            return None
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            if self.teacher is not None:
                teacher_logits = self.teacher(**inputs).logits
            else:
                teacher_logits = _sharded_teacher_logits(model, self.teacher_shards, inputs)
        return self.weight * distillation_kl(outputs.logits, teacher_logits, batch["attention_mask"], self.temperature)

    def after_task(self, ctx: TaskContext) -> None:
        self.teacher, self.teacher_shards = None, []  # free the copy; the next task snapshots its own start

    def state_dict(self) -> PluginState:
        return PluginState(meta={"weight": self.weight, "temperature": self.temperature})

    def load_state_dict(self, state: PluginState) -> None:
        pass  # nothing carries across tasks: the teacher is the model at the start of each task


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def _sharded_teacher_logits(model: torch.nn.Module, start: list[tuple[torch.nn.Parameter, torch.Tensor]], inputs: dict):
    """Logits of the FSDP2-sharded ``model`` (in eval mode) with each trained parameter's shard at its value in
    ``start``; the parameters are back at their current values on return. A collective: every rank calls it.

    Called between the student's forward and backward, so two things are restored with care: FSDP2 keeps the
    root unit's gathered parameters from the forward until backward, so the root is resharded (`reshard`)
    before the teacher's forward (which then gathers the teacher's values) and after it (so backward
    gathers the student's again); and a parameter another plugin's loss saved for its backward (O-LoRA's L2 term saves
    LoRA B) keeps its autograd version, since it is restored to the same values before backward runs.
    """
    current = [parameter.detach().clone() for parameter, _ in start]
    was_training = model.training
    try:
        _copy_into([parameter for parameter, _ in start], [value for _, value in start])
        reshard(model)
        model.eval()
        return model(**inputs).logits
    finally:
        _copy_into([parameter for parameter, _ in start], current)
        reshard(model)
        model.train(was_training)


def _copy_into(parameters: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    # A graph may have saved the DTensor parameter or its local shard: both keep their versions.
    with torch.autograd._unsafe_preserve_version_counter(tuple(t for p in parameters for t in (p, local_part(p)))):
        for parameter, value in zip(parameters, values):
            parameter.copy_(value)


def distillation_kl(student_logits, teacher_logits, mask, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over the vocabulary and averaged
    over the positions where mask is 1."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    mask = mask.to(per_position.dtype)
    return temperature**2 * (per_position * mask).sum() / mask.sum().clamp_min(1)
