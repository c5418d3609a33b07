"""Merging with the task's starting model, the coefficient chosen on validation records (WiSE-FT).

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (WiSE-FT): interpolating the weights
of a fine-tuned model with those it started from keeps much of the start's general ability for a
small cost on the new task. After each task

    theta_c = theta_start + c * (theta_end - theta_start),      c in `coefficients` (0 < c <= 1)

is scored on two validation sets that are never trained on and are never test sets: records of the
task carved from its training data before training (`validation_records` of them), and replay
records carved from the replay set the same way (earlier tasks' and self-synthesized samples: what
the model should keep; up to 64, at most a quarter; tasks/stage.py `carve_validation`), scored as
teacher-forced next-token accuracy on the supervised tokens. Scoring "kept" on replay examples the
stage also trained on would favour c = 1, the model that fitted them.
The plugin keeps the smallest c (the most of the starting model) whose summed score is within
`tolerance` of the best; without replay examples, the task's score alone. The curve (c, new-task
score, kept score) of every task is in the plugin's state, so the report plots it on the version.

Like averaging, it works on the weights the exported model holds (`trained_weights`), so under an
adapter it interpolates the merged weights exactly. theta_start is rebuilt by before_task from the
task-start model and is not part of state_dict.

Under FSDP2 theta_start and theta_end are held like the weights, DTensors of this rank's shard
(`TrainedWeight.value`): 1/W per rank; the interpolation is elementwise, and every rank scores the
same validation records with the sharded model, so every rank chooses the same coefficient.
"""

from __future__ import annotations

import torch

from models.cl.base import CLPlugin, PluginState, TaskContext, reshard, trained_weights
from models.data import IGNORE_INDEX, collate


class MergePlugin(CLPlugin):
    name = "merge"

    def __init__(self, coefficients: list[float] | tuple[float, ...] = (0.25, 0.5, 0.75, 1.0), validation_records: int = 24,
                 tolerance: float = 0.02, seed: int = 0):
        self.coefficients = sorted(coefficients)
        self.validation_records = validation_records  # the stage carves this many of the task's records for it
        self.tolerance = tolerance
        self.start: dict[str, torch.Tensor] = {}
        self.curves: dict[str, list[dict]] = {}  # task -> [{"coefficient", "task", "kept", "score"}], in order

    def before_task(self, ctx: TaskContext) -> None:
        with torch.no_grad():
            self.start = {weight.name: weight.value().detach().clone() for weight in trained_weights(ctx.model)}

    def after_task(self, ctx: TaskContext) -> None:
        if not self.start:
            raise RuntimeError("merge: before_task was not called, so there is no starting model to merge with")
        weights = [weight for weight in trained_weights(ctx.model) if weight.name in self.start]
        with torch.no_grad():
            end = {weight.name: weight.value().detach().clone() for weight in weights}
        curve = []
        for coefficient in self.coefficients:
            self._assign(weights, end, coefficient)
            task = token_accuracy(ctx.model, ctx.validation_examples, ctx.pad_token_id)
            kept = token_accuracy(ctx.model, ctx.retention_examples, ctx.pad_token_id)
            score = sum(value for value in (task, kept) if value is not None)
            curve.append({"coefficient": coefficient, "task": task, "kept": kept, "score": score})
        best = max(point["score"] for point in curve)
        chosen = next(point for point in curve if point["score"] >= best - self.tolerance)
        for point in curve:
            point["chosen"] = point is chosen
        self._assign(weights, end, chosen["coefficient"])
        self.curves[ctx.task_name] = curve
        self.start = {}

    def _assign(self, weights, end: dict[str, torch.Tensor], coefficient: float) -> None:
        for weight in weights:
            start = self.start[weight.name].to(end[weight.name].device)
            weight.assign(start + coefficient * (end[weight.name] - start))

    def state_dict(self) -> PluginState:
        return PluginState(meta={"curves": self.curves})

    def load_state_dict(self, state: PluginState) -> None:
        self.curves = {task: list(points) for task, points in state.meta.get("curves", {}).items()}


@torch.no_grad()
def token_accuracy(model: torch.nn.Module, examples: list[dict], pad_token_id: int, batch_size: int = 16) -> float | None:
    """Share of supervised tokens (labels not IGNORE_INDEX) the model predicts greedily, teacher-forced;
    None without examples."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        predicted = logits[:, :-1].argmax(-1).cpu()
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        right += int((predicted[mask] == labels[mask]).sum())
        total += int(mask.sum())
    reshard(model)  # the next coefficient's weights are assigned to the shards
    model.train(was_training)
    return right / total if total else None
