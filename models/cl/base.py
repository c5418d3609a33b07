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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer


@dataclass
class TaskContext:
    """What a plugin's task hooks see of the CL task being trained; the same on every rank."""

    task_index: int  # 0-based position in the CIT sequence
    task_name: str
    model: torch.nn.Module  # the model being trained (a PeftModel under lora/mora), never the DDP wrapper
    train_examples: list[dict]  # encoded {"input_ids", "labels"} of the current task
    pad_token_id: int = 0
    # For a plugin that asks for them (CLPlugin.validation_records): the task's records carved out of its
    # training data before training (never trained on), and replay examples (what the model should keep).
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
        through the trained parameters."""
        if self.layer is None:
            return self.tensor
        return self.tensor + self.layer.get_delta_weight(self.adapter).to(self.tensor.dtype)

    @torch.no_grad()
    def assign(self, value: torch.Tensor) -> None:
        """Make the effective weight ``value``; an adapter keeps its parameters and its base weight absorbs the rest."""
        if self.layer is not None:
            value = value - self.layer.get_delta_weight(self.adapter)
        self.tensor.copy_(value.to(self.tensor.device, self.tensor.dtype))


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
