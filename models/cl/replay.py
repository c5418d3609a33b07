"""Experience replay: choosing which past examples to keep, and mixing them into later training.

Everything here is plain Python over lists of records (canonical instruction records or encoded
examples); only `make_loss_fn` touches torch, for the `loss-mid` sampler.

Samplers (one per ReplayConfig.strategy), each choosing `budget_count(n, budget)` of a task's n records:
- ``uniform``:   a seeded uniform sample without replacement.
- ``reservoir``: Algorithm R (Vitter 1985) over a stream, so production never holds the whole
                 history; `Reservoir` keeps only (seen count, reservoir) and resumes from its state.
- ``loss-mid``:  drop the easiest and the hardest `quantile` of the records by the current model's
                 per-example loss, sample uniformly from the middle (neither trivial nor noise).
- ``balanced``:  equal numbers per label (the response by default), so a skewed task keeps its
                 minority answers.

Mixing replay into the next task (ReplayConfig.mixing), see `mix_examples`:
- ``concat``:     current + replay as one training set.
- ``interleave``: replay spread evenly through the current examples (a deterministic order).
- ``epoch``:      the replay examples as a separate training phase after the task.
Note: `models.engine.train` reads its examples through seeded per-epoch permutations, so within
one `train` call the order of the list does not matter and ``interleave`` trains like ``concat``;
the order matters only to a reader that consumes the list sequentially.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, get_args

from pydantic import TypeAdapter

from perennial.config import ReplayBudget, ReplayStrategy, stream_seed

STRATEGIES = get_args(ReplayStrategy)
_valid_budget = TypeAdapter(ReplayBudget).validate_python

# A function from a batch of records to one loss per record (lower = easier for the current model).
LossFn = Callable[[Sequence[dict]], Sequence[float]]


def round_half_up(value: float) -> int:
    """Rounding with halves going up (Python's round() rounds halves to even)."""
    return math.floor(value + 0.5)


def budget_count(num_records: int, budget: float) -> int:
    """How many of a task's records a budget keeps.

    A budget in (0, 1] is a fraction: round_half_up(budget * n), at least 1 when n > 0.
    A budget > 1 is a whole count: min(budget, n). Raises ValueError for a budget
    perennial.config.ReplayBudget refuses (<= 0, or a fraction above 1).
    """
    budget = _valid_budget(budget)
    if num_records == 0:
        return 0
    if budget <= 1:
        return max(1, min(num_records, round_half_up(budget * num_records)))
    return min(int(budget), num_records)


# --- samplers -------------------------------------------------------------------------------------


def sample_uniform(records: Sequence[dict], count: int, seed: int) -> list[dict]:
    """`count` records chosen uniformly without replacement, kept in their original order."""
    chosen = sorted(random.Random(seed).sample(range(len(records)), min(count, len(records))))
    return [records[i] for i in chosen]


class Reservoir:
    """Algorithm R: a uniform sample of fixed `capacity` from a stream of unknown length.

    The i-th item (0-based) replaces a random slot with probability capacity/(i+1). The random draw
    for item i comes from its own generator seeded by (seed, i), so the state to resume from is
    just (seen, items): a resumed stream makes exactly the choices an uninterrupted one would.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise ValueError("reservoir capacity must be >= 0")
        self.capacity = capacity
        self.seed = seed
        self.seen = 0
        self.items: list[Any] = []

    def _draw(self, index: int) -> int:
        return random.Random(stream_seed(self.seed, index)).randrange(index + 1)

    def add(self, item: Any) -> None:
        if len(self.items) < self.capacity:
            self.items.append(item)
        elif self.capacity:
            slot = self._draw(self.seen)
            if slot < self.capacity:
                self.items[slot] = item
        self.seen += 1

    def extend(self, items: Iterable[Any]) -> "Reservoir":
        for item in items:
            self.add(item)
        return self

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seed": self.seed, "seen": self.seen, "items": list(self.items)}

    @classmethod
    def from_state(cls, state: dict) -> "Reservoir":
        reservoir = cls(state["capacity"], state["seed"])
        reservoir.seen = state["seen"]
        reservoir.items = list(state["items"])
        return reservoir


def sample_reservoir(records: Iterable[dict], count: int, seed: int) -> list[dict]:
    return Reservoir(count, seed).extend(records).items


def sample_loss_mid(records: Sequence[dict], count: int, seed: int, loss_fn: LossFn, quantile: float = 0.1) -> list[dict]:
    """Middle-difficulty records: rank by `loss_fn`, drop the bottom and top `quantile`, sample the rest.

    The middle band holds ranks [floor(q*n), n - floor(q*n)). If the budget is larger than the band,
    the band is widened symmetrically around the median rank until it holds `count` records.
    """
    if not 0 <= quantile < 0.5:
        raise ValueError(f"loss-mid quantile must be in [0, 0.5), got {quantile}")
    losses = list(loss_fn(records))
    if len(losses) != len(records):
        raise ValueError(f"loss_fn returned {len(losses)} losses for {len(records)} records")
    order = sorted(range(len(records)), key=lambda i: (losses[i], i))
    cut = math.floor(quantile * len(records))
    middle = order[cut : len(order) - cut]
    if count > len(middle):
        start = max(0, (len(order) - count) // 2)
        chosen = order[start : start + count]
    else:
        chosen = random.Random(seed).sample(middle, count)
    return [records[i] for i in sorted(chosen)]


def _spread(counts_available: dict[Any, int], count: int, seed: int) -> dict[Any, int]:
    """Split `count` as equally as possible over groups, never giving a group more than it has.

    Groups that run short pass their share on to the others; the remainder of an uneven split goes
    to groups chosen at random (seeded), so no group is favoured by its name or position.
    """
    quota = {group: 0 for group in counts_available}
    remaining = min(count, sum(counts_available.values()))
    rng = random.Random(seed)
    while remaining:
        open_groups = [g for g in counts_available if quota[g] < counts_available[g]]
        share = remaining // len(open_groups)
        if share == 0:  # fewer left than groups: one more each for a random subset
            for group in rng.sample(open_groups, remaining):
                quota[group] += 1
            break
        for group in open_groups:
            take = min(share, counts_available[group] - quota[group])
            quota[group] += take
            remaining -= take
    return quota


def sample_balanced(records: Sequence[dict], count: int, seed: int, label_key: str = "response") -> list[dict]:
    """Equal numbers per label (records grouped by `record[label_key]`), uniform within each label."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[json.dumps(record.get(label_key), sort_keys=True)].append(index)
    quota = _spread({label: len(indices) for label, indices in groups.items()}, count, seed)
    rng = random.Random(seed + 1)
    chosen = [i for label, indices in groups.items() for i in rng.sample(indices, quota[label])]
    return [records[i] for i in sorted(chosen)]


def select(
    records: Iterable[dict],
    budget: float,
    strategy: str = "uniform",
    seed: int = 0,
    *,
    loss_fn: LossFn | None = None,
    quantile: float = 0.1,
    label_key: str = "response",
    total: int | None = None,
) -> list[dict]:
    """Choose a task's replay records with one of STRATEGIES under a per-task budget.

    `reservoir` streams `records` (any iterable); with a fractional budget it needs the stream's
    length, from len(records) or `total`. The other strategies read the records into a list.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown replay strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "reservoir":
        if total is None and hasattr(records, "__len__"):
            total = len(records)  # type: ignore[arg-type]
        if total is None:
            if budget <= 1:
                raise ValueError("reservoir sampling of a stream with a fractional budget needs total= (the stream length)")
            total = int(budget)  # a count budget needs no length: capacity is the count
        return sample_reservoir(records, budget_count(total, budget) if budget <= 1 else int(budget), seed)
    records = list(records)
    count = budget_count(len(records), budget)
    if strategy == "uniform":
        return sample_uniform(records, count, seed)
    if strategy == "balanced":
        return sample_balanced(records, count, seed, label_key)
    if loss_fn is None:
        raise ValueError("replay strategy 'loss-mid' needs a loss_fn (per-record loss of the current model)")
    return sample_loss_mid(records, count, seed, loss_fn, quantile)


def make_loss_fn(model, encode: Callable[[dict], dict], pad_token_id: int, batch_size: int = 16) -> LossFn:
    """A LossFn for `loss-mid`: each record's mean token loss under `model` (records encoded by `encode`).

    Imports torch lazily so the rest of this module stays plain Python.
    """
    import torch

    from models.data import IGNORE_INDEX, collate

    def losses(records: Sequence[dict]) -> list[float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        result: list[float] = []
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                batch = collate([encode(r) for r in records[start : start + batch_size]], pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                token_loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
                )
                counted = (labels != IGNORE_INDEX).sum(1).clamp_min(1)
                result.extend((token_loss.sum(1) / counted).tolist())
        model.train(was_training)
        return result

    return losses


# --- mixing -----------------------------------------------------------------------------------------


def concat(current: Sequence[dict], replay: Sequence[dict]) -> list[dict]:
    return list(current) + list(replay)


def interleave(current: Sequence[dict], replay: Sequence[dict], seed: int = 0) -> list[dict]:
    """Replay examples spread evenly through the current ones, both in a seeded shuffled order.

    Replay example j goes after current position round((j+1) * len(current) / (len(replay)+1)), so
    every stretch of the stream carries about the same share of replay.
    """
    rng = random.Random(seed)
    current, replay = list(current), list(replay)
    rng.shuffle(current)
    rng.shuffle(replay)
    slots: dict[int, list[dict]] = defaultdict(list)
    for j, example in enumerate(replay):
        slots[round_half_up((j + 1) * len(current) / (len(replay) + 1))].append(example)
    mixed: list[dict] = list(slots.get(0, []))
    for position, example in enumerate(current, start=1):
        mixed.append(example)
        mixed.extend(slots.get(position, []))
    return mixed


def mix_examples(current: Sequence[dict], replay: Sequence[dict], mode: str = "concat", seed: int = 0) -> list[dict]:
    """One training set from the current task and the replay examples (concat or interleave).

    mode='epoch' is refused here: it is two phases, not one set (tasks/cit.py trains the replay
    examples as a stage of their own).
    """
    if mode == "concat":
        return concat(current, replay)
    if mode == "interleave":
        return interleave(current, replay, seed)
    raise ValueError(f"replay mixing {mode!r} is not one training set; concat and interleave are")


def mix_general(domain_texts: Sequence[str], general_texts: Sequence[str], fraction: float, seed: int = 0) -> list[str]:
    """Domain documents with general documents mixed in, for domain-adaptive pretraining.

    Exact definition: the result R (shuffled with `seed`) holds G general and D domain documents with
    G == round_half_up(fraction * len(R)), where len(R) = D + G. All domain documents are kept
    (D = len(domain_texts)) and G is the smallest count meeting the equation; if fewer general
    documents exist than that needs, all of them are used (G = len(general_texts)) and D is the
    largest number of domain documents (a seeded sample) that keeps the equation true.
    fraction 0 returns the domain documents only, fraction 1 the general documents only. Published
    recipes mix 2-25% general text to limit forgetting of general ability.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"general mix fraction must be in [0, 1], got {fraction}")
    rng = random.Random(seed)
    domain, general = list(domain_texts), list(general_texts)
    if fraction == 0:
        mixed = domain
    elif fraction == 1:
        mixed = general
    else:
        if not general:
            raise ValueError(f"general mix fraction {fraction} needs general documents, but none were given")
        count_domain = len(domain)
        count_general = 0
        while round_half_up(fraction * (count_domain + count_general)) != count_general:
            count_general += 1  # terminates: each step moves the target by fraction < 1
        if count_general > len(general):
            count_general = len(general)
            while count_domain > 0 and round_half_up(fraction * (count_domain + count_general)) > count_general:
                count_domain -= 1
        mixed = rng.sample(domain, count_domain) + rng.sample(general, count_general)
    rng.shuffle(mixed)
    return mixed


# --- the buffer -------------------------------------------------------------------------------------


class ReplayBuffer:
    """Replay records per task, in task order; persisted as JSON lines {"task": name, "record": {...}}."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[dict]] = {}

    def add_task(
        self,
        task_name: str,
        records: Iterable[dict],
        budget: float = 0.1,
        strategy: str = "uniform",
        seed: int = 0,
        keep_earlier: bool = False,
        **options: Any,
    ) -> list[dict]:
        """Sample `task_name`'s records with `select` (options: loss_fn, quantile, label_key, total).

        Adding a task again replaces its samples, so a rerun of a stage leaves the same buffer.
        ``keep_earlier``: ``records`` are new records of a task the buffer already holds (a lineage
        trains a task again on what arrived since): their samples join the earlier ones, each share
        drawn under the same budget rule. Returns the new samples.
        """
        chosen = select(records, budget, strategy, seed, **options)
        earlier = self.tasks.pop(task_name, []) if keep_earlier else []
        self.tasks.pop(task_name, None)
        self.tasks[task_name] = earlier + chosen
        return chosen

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def records(self) -> list[dict]:
        return [record for records in self.tasks.values() for record in records]

    def __len__(self) -> int:
        return sum(len(records) for records in self.tasks.values())

    def to_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as handle:
            for task, records in self.tasks.items():
                for record in records:
                    handle.write(json.dumps({"task": task, "record": record}, sort_keys=True) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "ReplayBuffer":
        buffer = cls()
        for line in _lines(path):
            entry = json.loads(line)
            buffer.tasks.setdefault(entry["task"], []).append(entry["record"])
        return buffer


def _lines(path: str | Path) -> Iterator[str]:
    with open(path) as handle:
        for line in handle:
            if line.strip():
                yield line
