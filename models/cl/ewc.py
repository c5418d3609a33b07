"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks"), online variant (Schwarz et al. 2018, "Progress & Compress").

After each task the diagonal of the empirical Fisher information, E[(d log p(y|x) / d theta)^2], is
estimated from per-example gradients on `fisher_samples` of the task's training examples, and folded
into a running estimate F = decay * F_old + F_new. The anchor theta* is the parameters at the end of
that task. While training later tasks the penalty

    strength / 2 * sum_i F_i (theta_i - theta*_i)^2

pulls the weights that mattered for earlier tasks back towards their old values.

The penalty covers the weights the task trains (`models.cl.base.trained_weights`), by their names
in the exported model. Under full or selective tuning these are the trainable parameters. Under an
adapter (LoRA, MoRA, OSF) each task starts a fresh adapter on the previous task's merged weights,
so EWC anchors the merged weights: theta is each adapted layer's effective weight (base + the
adapter's update), theta* its value at the end of the previous task, and the penalty is
strength / 2 * sum F (base + dW - theta*)^2, which is F-weighted dW^2 at a task's start. The Fisher
of an effective weight is read from its base weight's gradient, which for an additive adapter is the
same gradient. This holds the Fisher and anchor of every adapted matrix (as under full tuning),
and each step forms the adapter's dW (d_out x d_in) per adapted layer.

Under FSDP2 Fisher and anchor are DTensors sharded like their weights (1/W per rank): the penalty is
elementwise, each rank sums its shard's terms and one all-reduce of that scalar makes the total
(`models.cl.base.whole`), whose gradient reaches each rank's shard directly. The Fisher pass runs
the same example on every rank (the sharded forward needs all of them); the reduce-scattered
gradient is then each rank's shard of that example's gradient.
"""

from __future__ import annotations

import random

import torch
from torch.distributed.tensor import DTensor

from models.cl.base import CLPlugin, PluginState, TaskContext, TrainedWeight, held_like, reshard, trained_weights, whole
from models.data import collate
from perennial.config import task_seed


class EWCPlugin(CLPlugin):
    name = "ewc"

    def __init__(self, strength: float = 100.0, fisher_samples: int = 64, decay: float = 1.0, seed: int = 0):
        self.strength = strength
        self.fisher_samples = fisher_samples
        self.decay = decay
        self.seed = seed
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.tasks_seen = 0
        self._device_copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._weights_of: torch.nn.Module | None = None
        self._trained: list[TrainedWeight] = []

    def before_task(self, ctx: TaskContext) -> None:
        # Found now, outside a forward pass: under FSDP2 the root unit's parameters stay gathered (not the
        # sharded parameters) between a forward and its backward, when extra_loss runs.
        for weight in self._weights(ctx.model):
            if weight.name in self.fisher and self.fisher[weight.name].shape == weight.tensor.shape:
                # State read from a checkpoint is whole: each rank keeps its shard (1/W) from here on.
                self.fisher[weight.name] = held_like(self.fisher[weight.name], weight.tensor)
                self.anchor[weight.name] = held_like(self.anchor[weight.name], weight.tensor)

    def extra_loss(self, model, batch, outputs):
        if not self.fisher:
            return None
        penalty = None
        for weight in self._weights(model):
            fisher = self.fisher.get(weight.name)
            if fisher is None or fisher.shape != weight.tensor.shape:
                continue  # a weight no earlier task trained has no anchor
            fisher, anchor = self._on_device(weight.name, weight.tensor)
            term = (fisher * (weight.value() - anchor) ** 2).sum()
            penalty = term if penalty is None else penalty + term
        return None if penalty is None else self.strength / 2 * whole(penalty)

    def _weights(self, model: torch.nn.Module) -> list[TrainedWeight]:
        """`trained_weights` of the model being trained, found once per task, not every micro-batch."""
        if self._weights_of is not model:
            self._weights_of, self._trained = model, trained_weights(model)
        return self._trained

    def _on_device(self, name: str, parameter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fisher and anchor on the parameter's device, copied once per task rather than every step; for a sharded
        parameter, whole state (read from a checkpoint after before_task) is cut to this rank's shard once and kept so."""
        cached = self._device_copies.get(name)
        if cached is None or cached[0].device != parameter.device:
            self.fisher[name] = held_like(self.fisher[name], parameter)
            self.anchor[name] = held_like(self.anchor[name], parameter)
            cached = (
                self.fisher[name].to(parameter.device, torch.float32),
                self.anchor[name].to(parameter.device, torch.float32),
            )
            self._device_copies[name] = cached
        return cached

    def after_task(self, ctx: TaskContext) -> None:
        weights = trained_weights(ctx.model)
        new_fisher = diagonal_fisher(
            ctx.model, ctx.train_examples, self.fisher_samples, ctx.pad_token_id, seed=task_seed(self.seed, ctx.task_index)
        )
        for weight in weights:
            value, old = new_fisher[weight.name], self.fisher.get(weight.name)
            fresh = old is None or old.shape != value.shape
            self.fisher[weight.name] = value if fresh else self.decay * held_like(old, weight.tensor) + value
        with torch.no_grad():
            self.anchor = {weight.name: _offloaded(weight.value().detach().float()).clone() for weight in weights}
        self.tasks_seen += 1
        self._device_copies = {}
        self._weights_of, self._trained = None, []

    def state_dict(self) -> PluginState:
        tensors = {f"fisher.{name}": value for name, value in self.fisher.items()}
        tensors.update({f"anchor.{name}": value for name, value in self.anchor.items()})
        return PluginState(tensors=tensors, meta={"tasks_seen": self.tasks_seen})

    def load_state_dict(self, state: PluginState) -> None:
        self.fisher = {k[len("fisher.") :]: v.clone() for k, v in state.tensors.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor.") :]: v.clone() for k, v in state.tensors.items() if k.startswith("anchor.")}
        self.tasks_seen = int(state.meta.get("tasks_seen", 0))
        self._device_copies = {}


def diagonal_fisher(
    model: torch.nn.Module, examples: list[dict], num_samples: int, pad_token_id: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the trained weights (`trained_weights`): the mean over examples of the
    squared gradient of each example's log-likelihood (its mean token loss), one example at a time.

    Per-example gradients matter: squaring a batch-mean gradient would cancel disagreeing examples
    and underestimate the Fisher. An adapted layer's effective weight W = base + dW gets the gradient
    of its frozen base weight, made to require grad for this pass only: the layer computes
    base(x) + adapter(x), so d loss / d W = d loss / d base. Returns float32 CPU tensors keyed by the
    weights' names, each shaped as the weight; under FSDP2 DTensors sharded like them, on their device
    (every rank must call it with the same examples: each forward and backward is a collective).
    """
    weights = trained_weights(model)
    fisher = {w.name: torch.zeros_like(w.tensor, dtype=torch.float32) if isinstance(w.tensor, DTensor)
              else torch.zeros(w.tensor.shape, dtype=torch.float32) for w in weights}
    if not examples:
        return fisher
    chosen = random.Random(seed).sample(range(len(examples)), min(num_samples, len(examples)))
    device = next(model.parameters()).device
    was_training = model.training
    frozen = [w.tensor for w in weights if not w.tensor.requires_grad]
    model.eval()  # no dropout: the Fisher of the model as it will be used
    counted = 0
    try:
        for tensor in frozen:
            tensor.requires_grad_(True)
        for index in chosen:
            batch = {k: v.to(device) for k, v in collate([examples[index]], pad_token_id).items()}
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            if not torch.isfinite(loss):  # an example with no supervised tokens carries no information
                continue
            loss.backward()
            counted += 1
            for w in weights:
                if w.tensor.grad is not None:
                    fisher[w.name] += _offloaded(w.tensor.grad.detach().float()) ** 2
    finally:
        for tensor in frozen:
            tensor.requires_grad_(False)
            tensor.grad = None
        model.zero_grad(set_to_none=True)
        reshard(model)  # after an example skipped before its backward, FSDP2 would keep the root unit gathered
        model.train(was_training)
    return {name: value / max(1, counted) for name, value in fisher.items()}


def _offloaded(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU, where state waits between tasks; a DTensor (a shard, 1/W) stays on its mesh's device."""
    return tensor if isinstance(tensor, DTensor) else tensor.cpu()
