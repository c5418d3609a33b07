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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TaskContext:
    """What a plugin's task hooks see of the CL task being trained; the same on every rank."""

    task_index: int  # 0-based position in the CIT sequence
    task_name: str
    model: torch.nn.Module  # the model being trained (a PeftModel under lora/mora), never the DDP wrapper
    train_examples: list[dict]  # encoded {"input_ids", "labels"} of the current task
    pad_token_id: int = 0


@dataclass
class PluginState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class CLPlugin:
    """Base class: every hook is a no-op, so a method overrides only what it needs."""

    name = "plugin"
    needs_attentions = False

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
