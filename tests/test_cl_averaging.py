import pytest
import torch

from models.cl.averaging import AveragingPlugin
from perennial.config import AveragingConfig
from tests.test_cl_common import (
    HELD_OUT,
    context,
    model_after_task1,
    plain_after_task2,
    run_task,
    task_loss,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_after_task_sets_exactly_the_per_layer_interpolation():
    previous = model_after_task1()
    plain = plain_after_task2()
    plugin = AveragingPlugin(alpha=0.5, per_layer={r"layers\.0\.": 0.9, r"layers\.\d\.mlp": 0.0, "lm_head": 1.0})
    model = model_after_task1()
    ctx = context(model, 1)
    plugin.before_task(ctx)
    model.load_state_dict(plain.state_dict())  # "training" on task 2 gives the plain model
    plugin.after_task(ctx)
    old, new = dict(previous.named_parameters()), dict(plain.named_parameters())
    expected_alpha = {
        "model.layers.0.mlp.up_proj.weight": 0.9,  # first match wins: layers.0 before mlp
        "model.layers.1.mlp.up_proj.weight": 0.0,
        "model.layers.1.self_attn.q_proj.weight": 0.5,
        "lm_head.weight": 1.0,
    }
    for name, parameter in model.named_parameters():
        alpha = plugin.alpha_for(name)
        assert torch.equal(parameter.detach(), alpha * old[name].detach() + (1 - alpha) * new[name].detach()), name
        if name in expected_alpha:
            assert alpha == expected_alpha[name]
    assert torch.equal(model.lm_head.weight, previous.lm_head.weight)


def test_only_trainable_parameters_are_averaged():
    model = model_after_task1()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("layers.1" in name)
    plugin = AveragingPlugin(alpha=0.5)
    ctx = context(model, 1)
    plugin.before_task(ctx)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    plugin.after_task(ctx)
    start = dict(model_after_task1().named_parameters())
    for name, parameter in model.named_parameters():
        shift = 0.5 if "layers.1" in name else 1.0
        assert torch.allclose(parameter, start[name] + shift), name


def test_averaging_forgets_less_than_plain_fine_tuning():
    model = model_after_task1()
    run_task(model, 1, [AveragingPlugin(alpha=0.5)])
    plain = plain_after_task2()
    assert task_loss(model, HELD_OUT[0]) < task_loss(plain, HELD_OUT[0]) - 1.0


def test_per_layer_config_is_validated():
    assert AveragingConfig(name="averaging", per_layer={"lm_head": 0.2}).per_layer == {"lm_head": 0.2}
    with pytest.raises(ValueError, match="regex"):
        AveragingConfig(name="averaging", per_layer={"layers.(": 0.2})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AveragingConfig(name="averaging", per_layer={"lm_head": 1.5})
