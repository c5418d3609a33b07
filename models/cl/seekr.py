"""SEEKR: Selective Attention-Guided Knowledge Retention (He et al. 2024, "SEEKR: Selective
Attention-Guided Knowledge Retention for Continual Learning of Large Language Models", EMNLP).

Replay with distillation, where besides the output distribution the student also matches the old
model's attention maps, but only on the attention heads that matter most for retention.

Per task t (following the reference implementation):
1. before_task: pick `samples_per_task` of the task's examples (its replay samples) and record
   every head's attention on them with the model as it is before training on t.
2. train t; on every micro-batch `extra_loss` draws a mini-batch of replay samples of earlier
   tasks and returns
       (1 - alpha) * CE(replay) + alpha * KL(teacher logits || student) + beta * attention KL,
   where the attention KL runs over the heads stored with each sample. Without stored logits
   (store_logits=False) the logits term is dropped and the replay CE keeps weight 1.
3. after_task, on the task's replay samples with the trained model:
   - task sensitivity of head (l, h): the mean squared gradient of the loss w.r.t. its attention
     weights (how much the loss reacts to changing that head), normalised to sum to 1 per layer;
   - forgettability: the mean squared change of its attention from step 1 to now (how much
     training moves that head);
   - importance += sensitivity * forgettability (accumulated over tasks);
   - two-level selection: the `layer_budget` layers with the largest summed importance, then the
     `head_budget` most important heads within those layers (in total, not per layer);
   - the replay samples are stored with the trained model's (the teacher's) attention maps of the
     selected heads, and its logits at the supervised positions when store_logits.
Samples of earlier tasks keep the heads and teacher maps stored with them.

Requirements: attention weights are only returned by the eager attention implementation
(`attn_implementation="eager"`, model.attn_implementation in the config); sdpa and flash attention
compute attention without materialising the weights and return none, so SEEKR raises an error
when `outputs.attentions` is missing.

Memory: between before_task and after_task the pre-training attention maps of the task's samples
are held on CPU (samples x layers x heads x len^2 floats); the stored memory holds, per sample, the
selected heads' maps (heads x len^2) and, with store_logits, one vocabulary-sized row per
supervised token. Keep samples_per_task and the sequence length modest on large models. The
reference code's query budget (distilling only some query rows) is not implemented.

Under FSDP2 every hook runs the sharded model's own forward (and backward) on the same samples on
every rank, so every rank computes and holds the same statistics, selection and memory, as under
DDP: none of it is shaped like a weight, so none of it is sharded.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from models.cl.base import CLPlugin, PluginState, TaskContext, reshard
from models.data import IGNORE_INDEX, collate
from models.engine import stream_indices
from perennial.config import stream_seed

NO_ATTENTIONS = (
    "SEEKR needs attention weights, but the model returned none: load it with attn_implementation='eager' "
    "(model.attn_implementation: eager); sdpa and flash attention do not return attention weights"
)


class SEEKRPlugin(CLPlugin):
    name = "seekr"
    needs_attentions = True

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 1.0,
        layer_budget: int = 2,
        head_budget: int = 4,
        store_logits: bool = True,
        samples_per_task: int = 32,
        replay_batch_size: int = 4,
        seed: int = 0,
    ):
        self.alpha = alpha
        self.beta = beta
        self.layer_budget = layer_budget
        self.head_budget = head_budget
        self.store_logits = store_logits
        self.samples_per_task = samples_per_task
        self.replay_batch_size = replay_batch_size
        self.seed = seed
        self.importance: torch.Tensor | None = None  # [layers, heads], accumulated over tasks
        self.selected: list[tuple[int, int]] = []  # (layer, head) chosen after the last task
        self.memory: list[dict] = []  # {"task", "input_ids", "labels", "heads", "attn", "logits"}
        self.step = 0  # replay mini-batches drawn so far: the replay order is a function of it
        self._probe: list[dict] = []
        self._before: list[torch.Tensor] = []
        self._pad_token_id = 0

    # --- hooks ---------------------------------------------------------------------------------

    def before_task(self, ctx: TaskContext) -> None:
        self._pad_token_id = ctx.pad_token_id
        rng = random.Random(stream_seed(self.seed, ctx.task_index))
        count = min(self.samples_per_task, len(ctx.train_examples))
        chosen = sorted(rng.sample(range(len(ctx.train_examples)), count))
        self._probe = [
            {"task": ctx.task_name, "input_ids": list(ctx.train_examples[i]["input_ids"]),
             "labels": list(ctx.train_examples[i].get("labels", ctx.train_examples[i]["input_ids"]))}
            for i in chosen
        ]
        self._before = [maps.cpu() for maps in attention_maps(ctx.model, self._probe)]

    def extra_loss(self, model, batch, outputs):
        if outputs.attentions is None or not outputs.attentions or outputs.attentions[0] is None:
            raise RuntimeError(NO_ATTENTIONS)
        if not self.memory:
            return None
        size = min(self.replay_batch_size, len(self.memory))
        picked = [self.memory[i] for i in stream_indices(len(self.memory), self.seed, self.step * size, size)]
        self.step += 1
        device = batch["input_ids"].device
        replay = {k: v.to(device) for k, v in collate(picked, self._pad_token_id).items()}
        student = model(**replay, output_attentions=True)
        if student.attentions is None or not student.attentions or student.attentions[0] is None:
            raise RuntimeError(NO_ATTENTIONS)
        return self.replay_loss(student, replay, picked)

    def replay_loss(self, student, replay: dict, picked: list[dict]) -> torch.Tensor:
        """(1 - alpha) * CE + alpha * logits KL + beta * attention KL on a collated replay batch."""
        has_logits = all(sample.get("logits") is not None for sample in picked)
        ce_weight = (1 - self.alpha) if has_logits else 1.0
        loss = ce_weight * student.loss if ce_weight else student.loss.new_zeros(())
        if has_logits and self.alpha:
            loss = loss + self.alpha * self._logits_kl(student.logits, replay, picked)
        if self.beta:
            loss = loss + self.beta * self._attention_kl(student.attentions, picked)
        return loss

    def _logits_kl(self, logits: torch.Tensor, replay: dict, picked: list[dict]) -> torch.Tensor:
        student_rows, teacher_rows = [], []
        for row, sample in enumerate(picked):
            positions = supervised_positions(sample["labels"]).to(logits.device)
            student_rows.append(logits[row, positions])
            teacher_rows.append(sample["logits"].to(logits.device))
        log_student = F.log_softmax(torch.cat(student_rows).float(), dim=-1)
        log_teacher = F.log_softmax(torch.cat(teacher_rows).float(), dim=-1)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
        return kl.mean() if kl.numel() else logits.new_zeros(())

    def _attention_kl(self, attentions, picked: list[dict]) -> torch.Tensor:
        per_sample = []
        for row, sample in enumerate(picked):
            length = len(sample["input_ids"])
            student = torch.stack([attentions[layer][row, head, :length, :length] for layer, head in sample["heads"]])
            per_sample.append(attention_kl(student, sample["attn"].to(student.device)))
        return torch.stack(per_sample).mean()

    def after_task(self, ctx: TaskContext) -> None:
        if not self._probe:
            raise RuntimeError("SEEKR: before_task was not called, so there are no attention maps from before the task")
        model = ctx.model
        sensitivity, forgettability = head_statistics(model, self._probe, self._before)
        importance = head_importance(sensitivity, forgettability)
        self.importance = importance if self.importance is None else self.importance + importance
        self.selected = select_heads(self.importance, self.layer_budget, self.head_budget)
        maps = attention_maps(model, self._probe, logits=self.store_logits)
        for sample, (attn, logits) in zip(self._probe, maps):
            self.memory.append({
                **sample,
                "heads": [list(pair) for pair in self.selected],
                "attn": torch.stack([attn[layer, head] for layer, head in self.selected]).cpu(),
                "logits": logits[supervised_positions(sample["labels"])].cpu() if logits is not None else None,
            })
        self._probe, self._before = [], []

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self) -> PluginState:
        tensors: dict[str, torch.Tensor] = {}
        if self.importance is not None:
            tensors["importance"] = self.importance
        samples = []
        for index, sample in enumerate(self.memory):
            tensors[f"attn.{index}"] = sample["attn"].contiguous()
            if sample["logits"] is not None:
                tensors[f"logits.{index}"] = sample["logits"].contiguous()
            samples.append({k: sample[k] for k in ("task", "input_ids", "labels", "heads")})
        meta = {"step": self.step, "selected": [list(pair) for pair in self.selected], "samples": samples}
        return PluginState(tensors=tensors, meta=meta)

    def load_state_dict(self, state: PluginState) -> None:
        # The in-task probe (_probe, _before) is left alone: before_task rebuilds it from the
        # task-start model, and the engine loads a mid-task checkpoint after before_task ran.
        self.importance = state.tensors["importance"].clone() if "importance" in state.tensors else None
        self.step = int(state.meta.get("step", 0))
        self.selected = [tuple(pair) for pair in state.meta.get("selected", [])]
        self.memory = []
        for index, sample in enumerate(state.meta.get("samples", [])):
            logits = state.tensors.get(f"logits.{index}")
            self.memory.append({
                **sample,
                "heads": [list(pair) for pair in sample["heads"]],
                "attn": state.tensors[f"attn.{index}"].clone(),
                "logits": logits.clone() if logits is not None else None,
            })


# --- the pieces, as functions that tests can check one by one -------------------------------------


def supervised_positions(labels: list[int]) -> torch.Tensor:
    """Logit positions that predict a supervised token: i such that labels[i + 1] is not ignored."""
    return torch.tensor([i for i in range(len(labels) - 1) if labels[i + 1] != IGNORE_INDEX], dtype=torch.long)


def causal_mask(length: int) -> torch.Tensor:
    """The (query, key) pairs a causal attention map actually fills: key <= query."""
    return torch.tril(torch.ones(length, length, dtype=torch.bool))


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between attention rows [heads, queries, keys], averaged over heads
    and queries. Masked keys have teacher weight 0 and contribute nothing."""
    teacher = teacher.float()
    log_student = student.float().clamp_min(1e-12).log()
    log_teacher = teacher.clamp_min(1e-12).log()
    return (teacher * (log_teacher - log_student)).sum(-1).mean()


def _collect_attentions(outputs) -> list[torch.Tensor]:
    if outputs.attentions is None or not outputs.attentions or outputs.attentions[0] is None:
        raise RuntimeError(NO_ATTENTIONS)
    return list(outputs.attentions)


def attention_maps(model, samples: list[dict], logits: bool = False):
    """Every head's attention per sample, [layers, heads, len, len] (and the logits [len, vocab]
    when logits=True, as (maps, logits) pairs). One sample at a time, so there is no padding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = []
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample["input_ids"]], device=device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
            maps = torch.stack([a[0].float() for a in _collect_attentions(out)])
            results.append((maps.cpu(), out.logits[0].float().cpu()) if logits else maps.cpu())
    reshard(model)  # forward only: FSDP2 would keep the root unit gathered
    model.train(was_training)
    return results


def head_statistics(model, samples: list[dict], before: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sensitivity, forgettability), each [layers, heads], averaged over the samples.

    sensitivity: mean over the causal (query, key) pairs of (dLoss/dAttention)^2;
    forgettability: mean over the same pairs of (attention_before - attention_now)^2.
    The input embeddings' output is made a leaf that requires grad, so every layer's attention is in the
    autograd graph even when the layers below it are frozen; parameter grads are cleared after. (By a
    forward hook, inside the model's own forward: under FSDP2 the embedding's weight is whole only there.)
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sensitivity = forgettability = None
    leaf = model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.detach().requires_grad_(True))
    try:
        for sample, old in zip(samples, before):
            ids = torch.tensor([sample["input_ids"]], device=device)
            labels = torch.tensor([sample["labels"]], device=device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, output_attentions=True)
            sens, forg = _sample_statistics(out, old.to(device), ids.shape[1])
            sensitivity = sens if sensitivity is None else sensitivity + sens
            forgettability = forg if forgettability is None else forgettability + forg
    finally:
        leaf.remove()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return (sensitivity / len(samples)).cpu(), (forgettability / len(samples)).cpu()


def _sample_statistics(out, old: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's (sensitivity, forgettability), each [layers, heads], from its forward's outputs; runs its backward."""
    attentions = _collect_attentions(out)
    for attention in attentions:
        attention.retain_grad()
    out.loss.backward()
    mask = causal_mask(length).to(old.device)
    grads = torch.stack([a.grad[0].float() for a in attentions])  # [layers, heads, len, len]
    now = torch.stack([a[0].detach().float() for a in attentions])
    sens = (grads**2 * mask).sum((-1, -2)) / mask.sum()
    forg = ((now - old) ** 2 * mask).sum((-1, -2)) / mask.sum()
    return sens, forg


def head_importance(sensitivity: torch.Tensor, forgettability: torch.Tensor) -> torch.Tensor:
    """Sensitivity normalised to sum to 1 within each layer, times forgettability."""
    normalised = sensitivity / sensitivity.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return normalised * forgettability


def select_heads(importance: torch.Tensor, layer_budget: int, head_budget: int) -> list[tuple[int, int]]:
    """Two-level selection: the top `layer_budget` layers by summed importance, then the top
    `head_budget` heads among those layers' heads (capped at how many they have). Ties go to the
    lower index. Returns (layer, head) pairs sorted by layer, then head."""
    num_layers, num_heads = importance.shape
    scores = importance.tolist()
    layer_order = sorted(range(num_layers), key=lambda layer: (-sum(scores[layer]), layer))
    layers = layer_order[: min(layer_budget, num_layers)]
    candidates = sorted(((layer, head) for layer in layers for head in range(num_heads)),
                        key=lambda pair: (-scores[pair[0]][pair[1]], pair))
    return sorted(candidates[:head_budget])
