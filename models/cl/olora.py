"""O-LoRA: orthogonal subspace learning (Wang et al. 2023, "Orthogonal Subspace Learning for
Language Model Continual Learning", Findings of EMNLP).

Each task learns its update in a fresh LoRA subspace, kept orthogonal to the subspaces of earlier
tasks so that the new update interferes little with what they learned. For every LoRA-wrapped
layer, with A_old the earlier tasks' LoRA A matrices stacked along the rank dimension:

    extra_loss = lambda_orth * sum_layers sum_ij |(A_old @ A_new^T)_ij|  +  lambda_l2 * sum ||new adapter||^2

where the optional L2 term runs over the trainable adapter's A and B matrices.

Folding (the choice made here): after each task the adapter's update dW = B @ A * scaling is added
into the frozen base weight, A is appended to A_old (the plugin's state), and the adapter is
re-initialised for the next task (A kaiming-uniform as peft does, B zeros, so the model's function
is unchanged by the fold). Keeping every old adapter frozen and separate (as the paper does) gives
the same function but grows the forward pass with each task; folding keeps one adapter and is what
the stage runner's export does anyway (it merges the adapter into the base weights, and the next
stage starts a fresh adapter). Only the A_old subspaces are needed to keep later tasks orthogonal.

Requirements: the model must be a peft LoRA model (cit.tuning.method: lora), without DoRA or
LoRA bias; layers are matched across tasks by module name, so keep tuning.target_modules fixed.

Under FSDP2 the product A_old @ A_new^T needs A_new whole: each step gathers the LoRA A matrices
alone (r x d_in per layer, `models.cl.base.whole`) and every rank computes the same penalty, whose
gradient reaches each rank's shard of A. A_old stays whole on every rank (r x d_in per layer and
task); the fold adds the sharded update to the sharded base weight shard by shard, and the fresh
adapter is drawn whole from the same seed on every rank, as one process draws it, each rank
keeping its shard.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from models.cl.base import CLPlugin, PluginState, TaskContext, held_like, placed_like, whole
from perennial.config import stream_seed

NOT_LORA = "O-LoRA needs a peft LoRA model (cit.tuning.method: lora); the model has no LoRA layers"


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(module name, module, adapter name) for every trainable LoRA adapter of a linear layer."""
    found = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        for adapter, linear in lora_a.items():
            if linear.weight.requires_grad:
                found.append((name, module, adapter))
    return found


class OLoRAPlugin(CLPlugin):
    name = "olora"

    def __init__(self, lambda_orth: float = 0.5, lambda_l2: float = 0.0, seed: int = 0):
        self.lambda_orth = lambda_orth
        self.lambda_l2 = lambda_l2
        self.seed = seed
        self.old_a: dict[str, torch.Tensor] = {}  # module name -> [sum of earlier ranks, in_features]
        self.tasks_seen = 0
        self._device_copies: dict[str, torch.Tensor] = {}

    def before_task(self, ctx: TaskContext) -> None:
        layers = lora_layers(ctx.model)
        if not layers:
            raise ValueError(NOT_LORA)
        for name, module, adapter in layers:
            if getattr(module, "use_dora", {}).get(adapter, False) or getattr(module, "lora_bias", {}).get(adapter, False):
                raise ValueError(f"O-LoRA supports plain LoRA only; {name} uses DoRA or a LoRA bias")
        if any(p.requires_grad for name, p in ctx.model.named_parameters() if ".lora_embedding_" in name):
            raise ValueError("O-LoRA supports LoRA on linear layers only; remove embeddings from tuning.target_modules")
        self._check_same_layers(layers)
        self._device_copies = {}

    def _check_same_layers(self, layers: list[tuple[str, torch.nn.Module, str]]) -> None:
        """A_old of a layer constrains only that layer's new A: the earlier subspaces must be of exactly these
        layers, with their input widths, or some layer would train unconstrained without a word."""
        if not self.old_a:
            return
        current = {name: module.lora_A[adapter].weight.shape[1] for name, module, adapter in layers}
        earlier = {name: a.shape[1] for name, a in self.old_a.items()}
        if current != earlier:
            differ = sorted(set(current.items()) ^ set(earlier.items()))
            raise ValueError(f"O-LoRA's earlier subspaces are for other LoRA layers than this task's (differing: {differ[:6]}); "
                             "keep tuning.target_modules and the model the same for every task")

    def extra_loss(self, model, batch, outputs):
        if not self.lambda_orth and not self.lambda_l2:
            return None
        orthogonality, l2 = None, None
        for name, module, adapter in lora_layers(model):
            a_new = whole(module.lora_A[adapter].weight).float()
            if self.lambda_orth and self.old_a:
                term = (self._old_on(name, a_new.device) @ a_new.T).abs().sum()
                orthogonality = term if orthogonality is None else orthogonality + term
            if self.lambda_l2:
                # B's squares are elementwise: summed on each shard, then over the ranks.
                term = a_new.pow(2).sum() + whole(module.lora_B[adapter].weight.float().pow(2).sum())
                l2 = term if l2 is None else l2 + term
        loss = None
        if orthogonality is not None:
            loss = self.lambda_orth * orthogonality
        if l2 is not None:
            loss = self.lambda_l2 * l2 if loss is None else loss + self.lambda_l2 * l2
        return loss

    def _old_on(self, name: str, device: torch.device) -> torch.Tensor:
        cached = self._device_copies.get(name)
        if cached is None or cached.device != device:
            cached = self.old_a[name].to(device, torch.float32)
            self._device_copies[name] = cached
        return cached

    def after_task(self, ctx: TaskContext) -> None:
        layers = lora_layers(ctx.model)
        if not layers:
            raise ValueError(NOT_LORA)
        # Seeded so a rerun re-initialises the next adapter identically; the global RNG is untouched.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(stream_seed(self.seed, ctx.task_index))
            for name, module, adapter in layers:
                a = whole(module.lora_A[adapter].weight.detach()).float().cpu()
                self.old_a[name] = a.clone() if name not in self.old_a else torch.cat([self.old_a[name], a])
                base = module.get_base_layer()
                base.weight += placed_like(module.get_delta_weight(adapter).to(base.weight.dtype), base.weight)
                reset_adapter(module, adapter)
        self.tasks_seen += 1
        self._device_copies = {}

    def overlap(self, model: torch.nn.Module) -> float:
        """sum over layers of |A_old @ A_new^T| for the current adapter: what the penalty drives down (under FSDP2 a
        collective: every rank calls it)."""
        with torch.no_grad():
            return float(sum(
                (self.old_a[name] @ whole(module.lora_A[adapter].weight.detach()).float().cpu().T).abs().sum()
                for name, module, adapter in lora_layers(model) if name in self.old_a
            ))

    def state_dict(self) -> PluginState:
        return PluginState(tensors={f"old_a.{k}": v for k, v in self.old_a.items()}, meta={"tasks_seen": self.tasks_seen})

    def load_state_dict(self, state: PluginState) -> None:
        self.old_a = {k[len("old_a.") :]: v.clone() for k, v in state.tensors.items() if k.startswith("old_a.")}
        self.tasks_seen = int(state.meta.get("tasks_seen", 0))
        self._device_copies = {}


def reset_adapter(module: torch.nn.Module, adapter: str) -> None:
    """peft's re-initialisation of a LoRA adapter (`reset_lora_parameters`: A kaiming-uniform, B zeros).

    Sharded (FSDP2) A and B are reset through whole stand-ins and each rank keeps its shard: every rank then
    draws the same whole matrices from the same seed, as one process does (a DTensor's own random fill
    draws per shard, which no single process reproduces).
    """
    linears = [module.lora_A[adapter], module.lora_B[adapter]]
    sharded = [linear.weight for linear in linears]
    if not any(isinstance(weight, DTensor) for weight in sharded):
        module.reset_lora_parameters(adapter, True)
        return
    for linear, weight in zip(linears, sharded):
        linear.weight = torch.nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
                                           requires_grad=weight.requires_grad)
    try:
        module.reset_lora_parameters(adapter, True)
        drawn = [linear.weight.detach() for linear in linears]
    finally:
        for linear, weight in zip(linears, sharded):
            linear.weight = weight  # the sharded parameter FSDP2 and the optimizer hold
    with torch.no_grad():
        for weight, value in zip(sharded, drawn):
            weight.copy_(held_like(value, weight))
