import copy

import pytest
import torch

from models.cl.olora import OLoRAPlugin, lora_layers
from models.data import collate
from tests.test_cl_common import (
    ALL_LINEAR,
    HELD_OUT,
    PAD,
    context,
    lora_model,
    model_after_task1,
    run_task,
    task_loss,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_o_lora_refuses_a_model_without_lora():
    with pytest.raises(ValueError, match="lora"):
        OLoRAPlugin().before_task(context(tiny_model(), 0))


def test_after_task_folds_the_update_into_the_base_and_starts_a_fresh_subspace():
    model = lora_model()
    plugin = OLoRAPlugin(lambda_orth=0.0)
    run_task(model, 0, [plugin], steps=5)
    assert len(plugin.old_a) == 4  # q_proj and v_proj of two layers
    assert all(a.shape == (4, 32) for a in plugin.old_a.values())
    batch = collate(HELD_OUT[0][:8], PAD)
    for name, module, adapter in lora_layers(model):
        assert torch.equal(module.lora_B[adapter].weight, torch.zeros_like(module.lora_B[adapter].weight))
        assert not torch.equal(module.lora_A[adapter].weight.detach(), plugin.old_a[name])  # re-initialised
    # The fold moved the update into the base weights: the model computes the same function as a
    # copy that merges its trained adapter the ordinary way.
    reference = lora_model()
    run_task(reference, 0, [], steps=5)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-5)
    ctx = context(model, 1)
    plugin.before_task(ctx)
    plugin.after_task(ctx)
    assert all(a.shape == (8, 32) for a in plugin.old_a.values())  # stacked along the rank


def test_penalty_is_the_stated_sum():
    model = lora_model()
    plugin = OLoRAPlugin(lambda_orth=0.7, lambda_l2=0.3)
    assert plugin.extra_loss(model, None, None).item() == pytest.approx(
        0.3 * sum(float(m.lora_A[a].weight.detach().pow(2).sum()) for _, m, a in lora_layers(model)), rel=1e-5
    )
    plugin.after_task(context(model, 0))
    with torch.no_grad():
        for _, module, adapter in lora_layers(model):
            module.lora_B[adapter].weight.fill_(0.1)
    expected = 0.0
    for name, module, adapter in lora_layers(model):
        a, b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()
        expected += 0.7 * float((plugin.old_a[name] @ a.T).abs().sum()) + 0.3 * float(a.pow(2).sum() + b.pow(2).sum())
    assert plugin.extra_loss(model, None, None).item() == pytest.approx(expected, rel=1e-5)


def test_orthogonality_term_shrinks_the_overlap_with_the_old_subspace():
    """LoRA over a model that knows task 1: task 2 in a first subspace, then task 3 with and without
    the orthogonality penalty, from the same state."""
    first = lora_model(model_after_task1(), ALL_LINEAR)
    warm = OLoRAPlugin()
    run_task(first, 1, [warm], steps=30, lr=3e-2)
    results = {}
    for lambda_orth in (0.0, 1.0):
        model = copy.deepcopy(first)
        plugin = OLoRAPlugin(lambda_orth=lambda_orth)
        plugin.load_state_dict(warm.state_dict())
        start_overlap = plugin.overlap(model)
        run_task(model, 2, [plugin], steps=30, lr=3e-2, after=False)
        results[lambda_orth] = (plugin.overlap(model), task_loss(model, HELD_OUT[2]))
    assert results[1.0][0] < 0.2 * results[0.0][0]
    assert results[1.0][0] < 0.5 * start_overlap
    assert results[1.0][1] < 0.5 * task_loss(first, HELD_OUT[2])  # the new task is still learnt
