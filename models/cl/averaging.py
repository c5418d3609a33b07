"""Weight averaging between consecutive models: after each task

    theta = alpha * theta_prev + (1 - alpha) * theta_new

where theta_prev is the model at the start of the task. A larger alpha keeps more of the previous
model (less forgetting, less learning). `per_layer` gives parameters their own alpha by regex
(re.search on the parameter name, first match wins, else `alpha`): heterogeneous model averaging
(Lin et al. 2024, "Mitigating the Alignment Tax of RLHF"), where different layers keep different
shares of the previous model because they differ in how much old ability they carry.
Related: Wortsman et al. 2022 (WiSE-FT, robust fine-tuning by weight-space ensembling).

Only the weights a task trains change, so only they are stored and averaged: the weights the
exported model will hold (`models.cl.base.trained_weights`). Under full or selective tuning these
are the trainable parameters. Under an adapter (LoRA, MoRA, OSF) they are the adapted layers'
effective weights, so theta is exactly the average of the task-start and task-end models (their
update scaled by 1 - alpha): the adapter keeps its parameters and the frozen base weight takes the
difference. (Averaging an adapter's A and B separately would not average its update B @ A.) The
task-start copy holds every trained weight, adapted matrices included (as under full tuning).

theta_prev is rebuilt by before_task from the task-start model, so it is not part of state_dict:
on a resume the stage runner calls before_task with the task-start model again.

Under FSDP2 theta_prev is held like the weights, a DTensor of this rank's shard
(`TrainedWeight.value`): 1/W per rank, and the average, elementwise, needs no communication.
"""

from __future__ import annotations

import re

import torch

from models.cl.base import CLPlugin, PluginState, TaskContext, trained_weights


class AveragingPlugin(CLPlugin):
    name = "averaging"

    def __init__(self, alpha: float = 0.5, per_layer: dict[str, float] | None = None, seed: int = 0):
        self.alpha = alpha
        self.per_layer = dict(per_layer or {})
        self._patterns = [(re.compile(pattern), value) for pattern, value in self.per_layer.items()]
        self.previous: dict[str, torch.Tensor] = {}

    def alpha_for(self, name: str) -> float:
        for pattern, value in self._patterns:
            if pattern.search(name):
                return value
        return self.alpha

    def before_task(self, ctx: TaskContext) -> None:
        with torch.no_grad():
            self.previous = {weight.name: weight.value().detach().clone() for weight in trained_weights(ctx.model)}

    def after_task(self, ctx: TaskContext) -> None:
        if not self.previous:
            raise RuntimeError("averaging: before_task was not called, so there is no previous model to average with")
        with torch.no_grad():
            for weight in trained_weights(ctx.model):
                if weight.name in self.previous:
                    alpha = self.alpha_for(weight.name)
                    current = weight.value()
                    weight.assign(alpha * self.previous[weight.name].to(current.device, current.dtype) + (1 - alpha) * current)
        self.previous = {}

    def state_dict(self) -> PluginState:
        return PluginState(meta={"alpha": self.alpha, "per_layer": self.per_layer})

    def load_state_dict(self, state: PluginState) -> None:
        pass  # nothing carries across tasks: theta_prev is the model at the start of each task
