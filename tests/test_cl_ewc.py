import pytest
import torch

from models.cl.ewc import EWCPlugin, diagonal_fisher
from models.data import collate
from tests.test_cl_common import (
    HELD_OUT,
    PAD,
    TRAIN,
    context,
    model_after_task1,
    plain_after_task2,
    run_task,
    task_loss,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def fisher_distance(model, fisher, anchor) -> float:
    return float(sum((fisher[n] * (p.detach() - anchor[n]) ** 2).sum() for n, p in model.named_parameters()))


def test_fisher_is_the_mean_squared_per_example_gradient_of_trainable_parameters():
    model = tiny_model()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("layers.1" in name)  # a selective-tuning setup
    examples = TRAIN[0][:3]
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = torch.zeros_like(dict(model.named_parameters())[name])
    for example in examples:
        model.zero_grad()
        model(**collate([example], PAD)).loss.backward()
        expected += dict(model.named_parameters())[name].grad ** 2
    fisher = diagonal_fisher(model, examples, num_samples=3, pad_token_id=PAD)
    assert set(fisher) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert torch.allclose(fisher[name], expected / 3, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # no gradients leak into the next optimizer step


def test_fisher_accumulates_online_with_decay_and_the_anchor_is_the_end_of_task_weights():
    model = tiny_model()
    plugin = EWCPlugin(strength=1.0, fisher_samples=4, decay=0.5)
    plugin.after_task(context(model, 0))
    first = {k: v.clone() for k, v in plugin.fisher.items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    plugin.after_task(context(model, 1))
    second = diagonal_fisher(model, TRAIN[1], 4, PAD, seed=1)  # the plugin seeds task i with seed + i
    for name in first:
        assert torch.allclose(plugin.fisher[name], 0.5 * first[name] + second[name])
        assert torch.equal(plugin.anchor[name], dict(model.named_parameters())[name].detach())
    assert plugin.extra_loss(model, None, None).item() == pytest.approx(0.0)  # at the anchor: no penalty
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    expected = 0.5 * float((plugin.fisher["lm_head.weight"] * 0.1**2).sum())
    assert plugin.extra_loss(model, None, None).item() == pytest.approx(expected, rel=1e-4)


def test_ewc_keeps_important_weights_near_task_one_and_forgets_less():
    model = model_after_task1()
    plugin = EWCPlugin(strength=1000.0, fisher_samples=32)
    plugin.after_task(context(model, 0))  # as at the end of task 1
    fisher, anchor = dict(plugin.fisher), dict(plugin.anchor)
    assert plugin.extra_loss(model, None, None) is not None
    run_task(model, 1, [plugin])
    plain = plain_after_task2()
    assert fisher_distance(model, fisher, anchor) < 0.5 * fisher_distance(plain, fisher, anchor)
    assert task_loss(model, HELD_OUT[0]) < task_loss(plain, HELD_OUT[0]) - 1.0
    assert task_loss(model, HELD_OUT[1]) < 0.1 * task_loss(model_after_task1(), HELD_OUT[1])  # task 2 still learnt
