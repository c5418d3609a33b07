"""The hook interface every continual-learning method implements (Avalanche-style plugins).

The training engine (models/engine.py) calls, for each task of the CIT sequence:

    for plugin in plugins: plugin.before_task(ctx)
    for each optimizer step:
        outputs = model(**batch, output_attentions=any(p.needs_attentions for p in plugins))
        loss = outputs.loss + sum(plugin.extra_loss(model, batch, outputs) for each plugin, skipping None)
        loss.backward(); clip; optimizer.step(); scheduler.step()
    for plugin in plugins: plugin.after_task(ctx)

`state_dict()` / `load_state_dict()` make a plugin checkpoint and resume with the model:
tensors go to safetensors, everything else to JSON.

A plugin whose state is per weight (EWC's Fisher and anchor, averaging's task-start weights) reads
the model through `trained_weights`: the weights as the exported model will hold them, under the
names they have there. Under full or selective tuning that is each trainable parameter. Under an
adapter (LoRA, MoRA, OSF) it is each adapted layer's effective weight, its frozen base weight plus
the adapter's update; every task starts a fresh adapter on the previous task's merged weights, so
adapter parameters of two tasks share names but not meaning, while effective weights keep both.

Under FSDP2 (the engine's `strategy="fsdp"`; the stage shards the model before the first hook) every
parameter is a DTensor holding this rank's 1/W shard, and each plugin keeps its per-weight state
sharded the same way: `TrainedWeight.value` is then a DTensor placed like its weight, so task-start
copies, Fisher and anchor built from it hold 1/W each, and elementwise arithmetic on them needs no
communication. `whole` gathers what a plugin needs whole (O-LoRA's small LoRA A matrices, a penalty's
sum over the shards), `held_like` cuts whole state (read from a checkpoint) to this rank's shard,
and the engine gathers DTensor state whole when it writes a checkpoint (`models.engine.plugin_states`),
so the files are those one process writes. `held_bytes` measures what a plugin holds on one rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


@dataclass
class TaskContext:
    """What a plugin's task hooks see of the CL task being trained; the same on every rank."""

    task_index: int  # 0-based position in the CIT sequence
    task_name: str
    model: torch.nn.Module  # the model being trained (a PeftModel under lora/mora), never the DDP wrapper
    train_examples: list[dict]  # encoded {"input_ids", "labels"} of the current task
    pad_token_id: int = 0
    # For a plugin that asks for them (CLPlugin.validation_records): the task's records carved out of its
    # training data before training, and replay records carved out of the replay set (what the model should
    # keep): the stage trains on neither.
    validation_examples: list[dict] = field(default_factory=list)
    retention_examples: list[dict] = field(default_factory=list)


@dataclass
class PluginState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class CLPlugin:
    """Base class: every hook is a no-op, so a method overrides only what it needs."""

    name = "plugin"
    needs_attentions = False
    validation_records = 0  # records of each task the stage holds out of training for it (TaskContext.validation_examples)

    def before_task(self, ctx: TaskContext) -> None:
        pass

    def extra_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        return None

    def after_task(self, ctx: TaskContext) -> None:
        pass

    def state_dict(self) -> PluginState:
        return PluginState()

    def load_state_dict(self, state: PluginState) -> None:
        pass


@dataclass
class TrainedWeight:
    """One weight a task trains, as the model computes with it.

    ``name`` is its parameter name in the exported (merged) model, e.g.
    "model.layers.0.self_attn.q_proj.weight", whatever the tuning method, so state keyed by it
    refers to the same function of the model from task to task. ``tensor`` holds it: the trained
    parameter itself, or an adapted layer's frozen base weight (``layer`` and ``adapter`` set).
    """

    name: str
    tensor: torch.nn.Parameter
    layer: BaseTunerLayer | None = None
    adapter: str | None = None

    def value(self) -> torch.Tensor:
        """The effective weight now (base + the adapter's update, shaped as the base weight), differentiable
        through the trained parameters. Under FSDP2 a DTensor placed like ``tensor`` (this rank's shard)."""
        if self.layer is None:
            return self.tensor
        value = self.tensor + self._delta().to(self.tensor.dtype)
        return placed_like(value, self.tensor)

    def _delta(self) -> torch.Tensor:
        """The adapter's update (`get_delta_weight`). Sharded adapter parameters enter it through
        `DTensor.from_local`, whose backward redistributes their gradient to their own placement: DTensor
        arithmetic (the product of two sharded LoRA matrices) would otherwise hand a sharded parameter a
        replicated gradient, which FSDP2 cannot add its own shard of the gradient to."""
        own = {name: p for name, p in self.layer.named_parameters()
               if not name.startswith("base_layer.") and f".{self.adapter}." in f".{name}." and isinstance(p, DTensor)}
        if not own:
            return self.layer.get_delta_weight(self.adapter)
        guarded = {f"layer.{name}": DTensor.from_local(p.to_local(), p.device_mesh, p.placements, shape=p.shape,
                                                       stride=p.stride()) for name, p in own.items()}
        return torch.func.functional_call(_DeltaWeight(self.layer, self.adapter), guarded, ())

    @torch.no_grad()
    def assign(self, value: torch.Tensor) -> None:
        """Make the effective weight ``value`` (whole, or placed like ``tensor``); an adapter keeps its parameters
        and its base weight absorbs the rest."""
        value = held_like(value, self.tensor)
        if self.layer is not None:
            value = value - self.layer.get_delta_weight(self.adapter)
        self.tensor.copy_(placed_like(value, self.tensor).to(self.tensor.device, self.tensor.dtype))


class _DeltaWeight(torch.nn.Module):
    """A tuner layer's `get_delta_weight` as a forward, for `torch.func.functional_call` (TrainedWeight._delta)."""

    def __init__(self, layer: BaseTunerLayer, adapter: str):
        super().__init__()
        self.layer, self.adapter = layer, adapter

    def forward(self) -> torch.Tensor:
        return self.layer.get_delta_weight(self.adapter)


def trained_weights(model: torch.nn.Module) -> list[TrainedWeight]:
    """Every weight the model trains, once each (a tied matrix once): adapted layers first, then other parameters.

    Adapted layers (peft tuner layers with a trainable active adapter that has ``get_delta_weight``:
    LoRA, MoRA, OSF) give their base weight's effective value; any other trainable parameter gives
    itself. Raises ValueError for a tuner layer without ``get_delta_weight``, whose update cannot be
    read as a weight.
    """
    prefix = "base_model.model." if isinstance(model, PeftModel) else ""
    found: list[TrainedWeight] = []
    adapter_parameters: set[int] = set()
    for path, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        own = [(name, p) for name, p in module.named_parameters() if not name.startswith("base_layer.")]
        adapter_parameters.update(id(p) for _, p in own)
        for adapter in module.active_adapters:
            if not any(p.requires_grad and f".{adapter}." in f".{name}." for name, p in own):
                continue
            if not hasattr(module, "get_delta_weight"):
                raise ValueError(f"{path} ({type(module).__name__}) has no get_delta_weight: its update is not a weight")
            found.append(TrainedWeight(path.removeprefix(prefix) + ".weight", module.get_base_layer().weight, module, adapter))
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in adapter_parameters:
            found.append(TrainedWeight(name.removeprefix(prefix), parameter))
    return found


# --- FSDP2: state sharded like the weights -----------------------------------------------------------


def reshard(model: torch.nn.Module) -> None:
    """Under FSDP2, free the root unit's gathered parameters and register its shards on the modules again; a no-op
    for a model that is not sharded.

    FSDP2 keeps the root unit (embeddings, final norm, head) gathered after a forward, for the backward that
    follows in training (which reshards it). After a forward without backward (scoring, attention maps,
    a teacher) it would stay gathered: `named_parameters` would then give the gathered copies, not the
    parameters the optimizer and the plugins hold, and the next forward would not see shards changed
    meanwhile (by averaging, a merge coefficient, a swapped-in teacher). Plugins call it after such a forward.
    """
    if isinstance(model, FSDPModule):
        model.reshard()


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole on every rank: a DTensor gathered (`DTensor.full_tensor`, a collective: every rank calls
    it, in the same order), any other tensor itself.

    Differentiable, with the gradient each rank computes from the whole tensor (the same on every rank)
    reaching its own shard. A DTensor sum over shards (placement Partial, e.g. ``(dtensor ** 2).sum()``)
    becomes the total on every rank, each shard getting the gradient of the total.
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def held_like(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``value``, shaped as ``weight`` whole, held the way ``weight`` is.

    When ``weight`` is a DTensor (an FSDP2-sharded parameter) and ``value`` a plain tensor (whole, e.g. state
    read from a checkpoint, the same on every rank): a DTensor with ``weight``'s mesh and placements holding
    this rank's shard of ``value``, cut locally without communication, on the mesh's device, in
    ``value``'s dtype. Otherwise ``value`` itself.
    """
    if not isinstance(weight, DTensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.detach(), weight.device_mesh, weight.placements, src_data_rank=None)


def placed_like(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A DTensor ``value`` redistributed to DTensor ``weight``'s placements (DTensor arithmetic may choose others,
    e.g. a replicated product of two sharded LoRA matrices), so state built from it is 1/W and adds to the
    weight shard by shard; any other ``value`` itself."""
    if isinstance(value, DTensor) and isinstance(weight, DTensor) and value.placements != weight.placements:
        return value.redistribute(weight.device_mesh, weight.placements)
    return value


def held_bytes(plugin: CLPlugin, model: torch.nn.Module) -> int:
    """Bytes of the tensors ``plugin`` holds on this rank: its state, a teacher's weights, copies of task-start
    weights, found through its attributes (tensors, modules, dicts, lists, tuples, dataclasses).

    A DTensor counts its local shard. ``model``'s own parameters and buffers, which a plugin may reference
    (`TrainedWeight`, the model it caches), do not count, nor does a storage already counted (one
    tensor's copy moved to the device it is on is the same tensor).
    """
    own_modules = {id(module) for module in model.modules()}
    own_storages = {local_part(t).untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    counted: set[int] = set()
    visited: set[int] = set()
    total = 0

    def visit(item: Any) -> None:
        nonlocal total
        if id(item) in visited or id(item) in own_modules:
            return
        visited.add(id(item))
        if isinstance(item, torch.Tensor):
            local = local_part(item)
            storage = local.untyped_storage().data_ptr()
            if local.numel() and storage not in own_storages and storage not in counted:
                counted.add(storage)
                total += local.numel() * local.element_size()
        elif isinstance(item, torch.nn.Module):
            for tensor in [*item.parameters(), *item.buffers()]:
                visit(tensor)
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                visit(value)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            for value in vars(item).values():
                visit(value)

    for value in vars(plugin).values():
        visit(value)
    return total
