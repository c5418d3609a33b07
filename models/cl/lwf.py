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
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from models.cl.base import CLPlugin, PluginState, TaskContext


class LwFPlugin(CLPlugin):
    name = "lwf"

    def __init__(self, weight: float = 1.0, temperature: float = 2.0, seed: int = 0):
        self.weight = weight
        self.temperature = temperature
        self.teacher: torch.nn.Module | None = None

    def before_task(self, ctx: TaskContext) -> None:
        self.teacher = frozen_copy(ctx.model)

    def extra_loss(self, model, batch, outputs):
        if self.teacher is None:
            raise RuntimeError("LwF: before_task was not called, so there is no teacher model to distil from")
        if self.weight == 0:
            return None
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return self.weight * distillation_kl(outputs.logits, teacher_logits, batch["attention_mask"], self.temperature)

    def after_task(self, ctx: TaskContext) -> None:
        self.teacher = None  # free the copy; the next task snapshots its own start

    def state_dict(self) -> PluginState:
        return PluginState(meta={"weight": self.weight, "temperature": self.temperature})

    def load_state_dict(self, state: PluginState) -> None:
        pass  # nothing carries across tasks: the teacher is the model at the start of each task


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def distillation_kl(student_logits, teacher_logits, mask, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over the vocabulary and averaged
    over the positions where mask is 1."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    mask = mask.to(per_position.dtype)
    return temperature**2 * (per_position * mask).sum() / mask.sum().clamp_min(1)
