import pytest
import torch

from models.cl.seekr import (
    SEEKRPlugin,
    attention_kl,
    attention_maps,
    head_importance,
    head_statistics,
    select_heads,
)
from models.data import collate
from models.engine import train
from tests import tiny_models
from tests.test_cl_common import (
    PAD,
    TASK2_STEPS,
    TRAIN,
    VOCAB,
    context,
    model_after_task1,
    optim,
    plain_after_task2,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def seekr_after_task1(**options) -> SEEKRPlugin:
    """A SEEKR plugin that has seen task 1: before_task on the initial model, after_task on the trained one."""
    plugin = SEEKRPlugin(**{"samples_per_task": 16, "replay_batch_size": 4, "layer_budget": 1, "head_budget": 2, **options})
    ctx = context(tiny_model(), 0)
    plugin.before_task(ctx)
    ctx.model = model_after_task1()
    plugin.after_task(ctx)
    return plugin


def attention_gap(model, plugin: SEEKRPlugin) -> float:
    """Mean attention KL(teacher || model) over the stored samples and their stored heads."""
    maps = attention_maps(model, plugin.memory)
    gaps = [attention_kl(torch.stack([m[layer, head] for layer, head in s["heads"]]), s["attn"]) for m, s in zip(maps, plugin.memory)]
    return float(torch.stack(gaps).mean())


def test_two_level_selection_respects_both_budgets():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        importance = torch.rand(6, 8, generator=generator)
        chosen = select_heads(importance, layer_budget=2, head_budget=5)
        top_layers = set(importance.sum(1).topk(2).indices.tolist())
        assert len(chosen) == 5 and len(set(chosen)) == 5
        assert {layer for layer, _ in chosen} <= top_layers
        within = sorted((importance[l, h].item() for l in top_layers for h in range(8)), reverse=True)
        assert sorted((importance[l, h].item() for l, h in chosen), reverse=True) == within[:5]


def test_a_strong_head_in_a_weak_layer_is_not_selected():
    importance = torch.tensor([[0.9, 0.0, 0.0], [0.4, 0.4, 0.4], [0.3, 0.3, 0.2]])
    # Layer sums 0.9, 1.2, 0.8: with one layer, the single best head (0, 0) is left out.
    assert select_heads(importance, layer_budget=1, head_budget=2) == [(1, 0), (1, 1)]
    assert select_heads(importance, layer_budget=2, head_budget=3) == [(0, 0), (1, 0), (1, 1)]
    assert len(select_heads(importance, layer_budget=1, head_budget=10)) == 3  # capped at the layer's heads


def test_importance_is_layer_normalised_sensitivity_times_forgettability():
    sensitivity = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    forgettability = torch.tensor([[4.0, 4.0], [1.0, 3.0]])
    expected = torch.tensor([[0.25 * 4, 0.75 * 4], [0.5 * 1, 0.5 * 3]])
    assert torch.allclose(head_importance(sensitivity, forgettability), expected)


def test_head_statistics_measure_gradients_and_attention_change():
    model = model_after_task1()
    samples = TRAIN[0][:3]
    before = attention_maps(model, samples)
    sensitivity, forgettability = head_statistics(model, samples, before)
    assert sensitivity.shape == (2, 4) and bool((sensitivity > 0).all())
    assert torch.equal(forgettability, torch.zeros(2, 4))  # the model did not change
    assert all(p.grad is None for p in model.parameters())
    moved = [maps.clone() for maps in before]
    for maps in moved:
        maps[1, 2] = torch.tril(torch.ones_like(maps[1, 2])) / torch.arange(1, maps.shape[-1] + 1).unsqueeze(1)
    _, forgettability = head_statistics(model, samples, moved)
    assert forgettability[1, 2] > 0 and forgettability.sum() == forgettability[1, 2]


def test_after_task_stores_the_task_samples_with_the_selected_heads():
    plugin = seekr_after_task1()
    assert len(plugin.selected) == 2 and len({layer for layer, _ in plugin.selected}) == 1
    assert len(plugin.memory) == 16
    sample = plugin.memory[0]
    length = len(sample["input_ids"])
    assert sample["heads"] == [list(pair) for pair in plugin.selected]
    assert sample["attn"].shape == (2, length, length)
    assert sample["logits"].shape == (4, 64)  # one row per supervised (response) token
    assert plugin.importance.shape == (2, 4) and float(plugin.importance.sum()) > 0


def test_distillation_terms_vanish_when_the_student_is_the_teacher():
    plugin = seekr_after_task1(alpha=1.0, beta=1.0)
    model = model_after_task1()  # the teacher itself
    batch = collate(TRAIN[1][:4], PAD)
    loss = plugin.extra_loss(model, batch, model(**batch, output_attentions=True))
    assert abs(loss.item()) < 1e-6
    plugin = seekr_after_task1(alpha=0.5, beta=1.0)
    picked = [plugin.memory[i] for i in range(4)]
    replay = collate(picked, PAD)
    student = model(**replay, output_attentions=True)
    assert plugin.replay_loss(student, replay, picked).item() == pytest.approx(0.5 * student.loss.item(), abs=1e-6)
    assert plugin._attention_kl(student.attentions, picked).item() < 1e-6


def test_replay_batches_follow_the_step_counter():
    plugin = seekr_after_task1()
    model = model_after_task1()
    batch = collate(TRAIN[1][:4], PAD)
    outputs = model(**batch, output_attentions=True)
    first = [plugin.extra_loss(model, batch, outputs).item() for _ in range(3)]
    assert plugin.step == 3 and len(set(first)) > 1  # different replay mini-batches
    plugin.step = 0
    assert [plugin.extra_loss(model, batch, outputs).item() for _ in range(3)] == first


def test_missing_attention_weights_raise_a_clear_error():
    plugin = seekr_after_task1()
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    batch = collate(TRAIN[1][:4], PAD)
    with pytest.raises(RuntimeError, match="eager"):
        plugin.extra_loss(model, batch, model(**batch, output_attentions=True))


def test_seekr_keeps_attention_on_replayed_inputs_close_to_the_teacher():
    plugin = seekr_after_task1(beta=1.0)
    model = model_after_task1()
    train(model, TRAIN[1], optim(TASK2_STEPS), seed=1, pad_token_id=PAD, plugins=[plugin])
    replay_only = seekr_after_task1(beta=0.0)  # replay + logit distillation, no attention term
    other = model_after_task1()
    train(other, TRAIN[1], optim(TASK2_STEPS), seed=1, pad_token_id=PAD, plugins=[replay_only])
    with_attention = attention_gap(model, plugin)
    assert with_attention < 0.2 * attention_gap(plain_after_task2(), plugin)
    assert with_attention < 0.2 * attention_gap(other, plugin)


def test_grouped_query_attention_is_scored_and_distilled_per_query_head():
    """4 query heads over 2 KV heads: eager attention returns one map per query head (K and V repeated
    per group), so importance, selection, stored maps and the attention KL are per query head, and
    the two query heads of one KV head are told apart. SmolLM2 (9 over 3): tests/test_real_model.py."""
    model = tiny_models.tiny_model("llama", vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=PAD)
    plugin = SEEKRPlugin(samples_per_task=8, replay_batch_size=4, layer_budget=2, head_budget=3)
    plugin.before_task(context(model, 0))
    train(model, TRAIN[0], optim(10), seed=0, pad_token_id=PAD, plugins=[plugin])
    plugin.after_task(context(model, 0))
    assert plugin.importance.shape == (2, 4) and bool((plugin.importance > 0).all())
    grouped = plugin.importance.view(2, 2, 2)  # [layer, kv head, query head in its group]
    assert bool((grouped[..., 0] != grouped[..., 1]).all())
    assert len(plugin.selected) == 3 and all(0 <= head < 4 for _, head in plugin.selected)
    maps = attention_maps(model, plugin.memory[:2])
    for sample, sample_maps in zip(plugin.memory[:2], maps):
        assert sample_maps.shape[:2] == (2, 4)
        for (layer, head), stored in zip(sample["heads"], sample["attn"]):
            torch.testing.assert_close(stored, sample_maps[layer, head])
            assert not torch.allclose(stored, sample_maps[layer, head ^ 1], atol=1e-4)  # its KV-group sibling
    picked = plugin.memory[:4]
    student = model(**collate(picked, PAD), output_attentions=True)
    assert plugin._attention_kl(student.attentions, picked).item() < 1e-6  # the model is the teacher
    batch = collate(TRAIN[1][:4], PAD)
    loss = plugin.extra_loss(model, batch, model(**batch, output_attentions=True))
    assert torch.isfinite(loss) and loss.item() > 0
