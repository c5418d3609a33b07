import json
import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from models.cl.replay import (
    Reservoir,
    ReplayBuffer,
    budget_count,
    interleave,
    make_loss_fn,
    mix_examples,
    mix_general,
    round_half_up,
    select,
)
from models.data import collate
from models.engine import train
from tests.test_cl_common import (
    HELD_OUT,
    PAD,
    TASK2_STEPS,
    TRAIN,
    model_after_task1,
    optim,
    plain_after_task2,
    task_loss,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def records(count, **extra):
    return [{"id": i, "prompt": f"p{i}", "response": f"r{i % 3}", **extra} for i in range(count)]


def test_budget_is_a_fraction_up_to_one_and_a_count_above():
    assert budget_count(400, 0.1) == 40
    assert budget_count(10, 0.25) == 3  # 2.5 rounds half up
    assert budget_count(5, 0.01) == 1  # a task always keeps at least one example
    assert budget_count(7, 1.0) == 7
    assert budget_count(100, 30) == 30
    assert budget_count(20, 50) == 20  # a count larger than the task keeps the whole task
    assert budget_count(0, 0.5) == 0
    with pytest.raises(ValueError):
        budget_count(10, 2.5)
    with pytest.raises(ValueError):
        budget_count(10, 0)


@pytest.mark.parametrize("strategy", ["uniform", "reservoir", "loss-mid", "balanced"])
@pytest.mark.parametrize("budget, expected", [(0.2, 20), (0.05, 5), (13, 13), (1.0, 100)])
def test_every_strategy_keeps_exactly_the_budget_of_distinct_records(strategy, budget, expected):
    data = records(100)
    chosen = select(data, budget, strategy, seed=3, loss_fn=lambda rs: [r["id"] * 7 % 100 for r in rs])
    assert len(chosen) == expected
    assert len({r["id"] for r in chosen}) == expected
    assert select(data, budget, strategy, seed=3, loss_fn=lambda rs: [r["id"] * 7 % 100 for r in rs]) == chosen


def test_reservoir_keeps_every_stream_position_equally_often():
    """Algorithm R is uniform: over many seeded streams each of the 40 positions is kept
    capacity/40 of the time (chi-square against uniform), and so is each reservoir slot's content."""
    stream, capacity, runs = 40, 8, 1500
    kept = Counter()
    for seed in range(runs):
        kept.update(Reservoir(capacity, seed).extend(range(stream)).items)
    observed = [kept[i] for i in range(stream)]
    assert sum(observed) == capacity * runs
    assert chisquare(observed).pvalue > 0.01
    # The early items (always admitted first) are not favoured over the late ones.
    first_half, second_half = sum(observed[: stream // 2]), sum(observed[stream // 2 :])
    assert abs(first_half - second_half) < 0.1 * capacity * runs


def test_reservoir_streams_and_resumes_from_its_state_exactly():
    def stream():  # a generator: the sampler never needs the whole history in memory
        for i in range(1000):
            yield {"id": i}

    straight = Reservoir(25, seed=7).extend(stream())
    first = Reservoir(25, seed=7)
    iterator = stream()
    for _ in range(400):
        first.add(next(iterator))
    state = json.loads(json.dumps(first.state_dict()))  # the state is plain JSON: seen count + reservoir
    assert state["seen"] == 400 and len(state["items"]) == 25
    resumed = Reservoir.from_state(state).extend(iterator)
    assert resumed.items == straight.items and resumed.seen == straight.seen == 1000
    assert select(stream(), 0.025, "reservoir", seed=7, total=1000) == straight.items
    with pytest.raises(ValueError, match="total"):
        select(stream(), 0.1, "reservoir", seed=7)  # a fraction of an unknown-length stream is undefined


def test_uniform_sampler_is_uniform_over_records():
    kept = Counter()
    for seed in range(600):
        kept.update(r["id"] for r in select(records(30), 0.2, "uniform", seed=seed))
    assert chisquare([kept[i] for i in range(30)]).pvalue > 0.01


def test_balanced_takes_equal_numbers_per_label_and_passes_on_shortfalls():
    skewed = [{"id": i, "response": "yes"} for i in range(70)]
    skewed += [{"id": 70 + i, "response": "no"} for i in range(20)]
    skewed += [{"id": 90 + i, "response": "maybe"} for i in range(10)]
    counts = Counter(r["response"] for r in select(skewed, 30, "balanced", seed=1))
    assert counts == {"yes": 10, "no": 10, "maybe": 10}
    # "maybe" has only 10: the others share its shortfall equally (45 = 10 + 17 + 18 in some order).
    counts = Counter(r["response"] for r in select(skewed, 45, "balanced", seed=1))
    assert counts["maybe"] == 10 and sorted([counts["yes"], counts["no"]]) == [17, 18]
    # Uniform sampling of the same skewed task would be dominated by the majority label.
    assert Counter(r["response"] for r in select(skewed, 30, "uniform", seed=1))["yes"] > 15


def test_loss_mid_leaves_out_the_easiest_and_hardest_examples():
    data = [{"id": i, "loss": (i * 37) % 100 / 10} for i in range(100)]  # a permutation of 0.0 .. 9.9

    def loss_fn(rs):
        return [r["loss"] for r in rs]

    for seed in range(5):
        chosen = select(data, 30, "loss-mid", seed=seed, loss_fn=loss_fn, quantile=0.2)
        assert len(chosen) == 30
        assert all(2.0 <= r["loss"] < 8.0 for r in chosen)  # ranks 20..79 only
    with pytest.raises(ValueError, match="loss_fn"):
        select(data, 30, "loss-mid")


def test_make_loss_fn_scores_records_by_the_models_per_example_loss():
    model = model_after_task1()
    by_id = {i: example for i, example in enumerate(HELD_OUT[0][:8] + HELD_OUT[1][:8])}
    loss_fn = make_loss_fn(model, encode=lambda r: by_id[r["id"]], pad_token_id=PAD, batch_size=5)
    losses = loss_fn([{"id": i} for i in by_id])
    with torch.no_grad():
        expected = [float(model(**collate([by_id[i]], PAD)).loss) for i in by_id]
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert max(losses[:8]) < min(losses[8:])  # the model knows task 1 and not task 2


def test_concat_and_interleave_keep_every_example_and_spread_replay_evenly():
    current = [{"id": f"c{i}"} for i in range(100)]
    replay = [{"id": f"r{i}"} for i in range(20)]
    assert mix_examples(current, replay, "concat") == current + replay
    mixed = mix_examples(current, replay, "interleave", seed=4)
    assert sorted(e["id"] for e in mixed) == sorted(e["id"] for e in current + replay)
    replay_at = [i for i, e in enumerate(mixed) if e["id"].startswith("r")]
    gaps = [b - a - 1 for a, b in zip(replay_at, replay_at[1:])]
    assert min(gaps) >= 4 and max(gaps) <= 5  # 100 current over 21 gaps: 4.76 between replays
    assert interleave(current, [], seed=0) != current and len(interleave(current, [], seed=0)) == 100


def test_epoch_mixing_is_not_one_training_set():
    current, replay = [{"id": "c"}] * 5, [{"id": "r"}] * 2
    with pytest.raises(ValueError, match="not one training set"):
        mix_examples(current, replay, "epoch")


@pytest.mark.parametrize("domain, general, fraction", [
    (800, 1500, 0.1), (800, 1500, 0.02), (800, 1500, 0.25), (37, 100, 0.33), (1, 5, 0.5), (100, 5, 0.2),
])
def test_mix_general_holds_exactly_the_stated_share_of_general_documents(domain, general, fraction):
    domain_docs = [f"d{i}" for i in range(domain)]
    general_docs = [f"g{i}" for i in range(general)]
    mixed = mix_general(domain_docs, general_docs, fraction, seed=0)
    count_general = sum(doc.startswith("g") for doc in mixed)
    assert count_general == round_half_up(fraction * len(mixed))
    assert len(set(mixed)) == len(mixed)
    needed = math.ceil(fraction * domain / (1 - fraction) - 0.5)
    if needed <= general:  # enough general text: every domain document is kept
        assert len(mixed) - count_general == domain
    else:  # too little: all general text is used and the domain side shrinks to keep the share
        assert count_general == general
    assert mix_general(domain_docs, general_docs, fraction, seed=0) == mixed
    assert mix_general(domain_docs, general_docs, fraction, seed=1) != mixed


def test_mix_general_edges():
    assert sorted(mix_general(["a", "b"], ["g"], 0.0)) == ["a", "b"]
    assert mix_general(["a", "b"], ["g"], 1.0) == ["g"]
    with pytest.raises(ValueError):
        mix_general(["a"], [], 0.1)
    with pytest.raises(ValueError):
        mix_general(["a"], ["g"], 1.5)


def test_replay_buffer_persists_per_task_samples(tmp_path):
    buffer = ReplayBuffer()
    first = buffer.add_task("arithmetic", records(100, task="arithmetic"), budget=0.1, strategy="uniform", seed=0)
    buffer.add_task("reverse", records(40, task="reverse"), budget=8, strategy="balanced", seed=0)
    buffer.add_task("fact_lookup", iter(records(50, task="fact_lookup")), budget=5, strategy="reservoir", seed=0)
    assert buffer.task_names() == ["arithmetic", "reverse", "fact_lookup"]
    assert [len(buffer.tasks[t]) for t in buffer.task_names()] == [10, 8, 5] and len(buffer) == 23
    assert buffer.add_task("arithmetic", records(100, task="arithmetic"), budget=0.1, seed=0) == first  # rerun: same
    assert buffer.task_names() == ["reverse", "fact_lookup", "arithmetic"] and len(buffer) == 23

    buffer.to_jsonl(tmp_path / "buffer.jsonl")
    loaded = ReplayBuffer.from_jsonl(tmp_path / "buffer.jsonl")
    assert loaded.tasks == buffer.tasks and loaded.records() == buffer.records()


def test_replaying_a_fifth_of_task_one_keeps_it_far_better_than_plain_fine_tuning():
    base_task2_loss = task_loss(model_after_task1(), HELD_OUT[1])
    model = model_after_task1()
    replayed = select(TRAIN[0], 0.2, "uniform", seed=0)
    assert len(replayed) == 32
    train(model, mix_examples(TRAIN[1], replayed, "concat"), optim(TASK2_STEPS), seed=1, pad_token_id=PAD)
    plain = plain_after_task2()
    with_replay, without = task_loss(model, HELD_OUT[0]), task_loss(plain, HELD_OUT[0])
    assert with_replay < 0.5 * without
    assert task_loss(model, HELD_OUT[1]) < 0.25 * base_task2_loss  # task 2 is still learnt
