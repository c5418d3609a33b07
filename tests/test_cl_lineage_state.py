"""Each CL plugin's state crosses retrains (issue #36): the night-2 retrain that continues a version builds
its plugins afresh, loads the state the version's checkpoint stores (models.engine.save_plugin_states,
the files of `perennial_plugins/`), and then trains otherwise than the same night with the state dropped.

The flow-level path (the champion's checkpoint as the first stage's plugin state) is in
tests/test_lineage.py; here each plugin, on the tiny synthetic task sequence of test_cl_common.
"""

from __future__ import annotations

import copy

import pytest
import torch

from models.cl.base import PluginState
from models.engine import load_plugin_states, save_plugin_states
from tests.test_cl_common import _plugin_cases, context, lora_model, run_task, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _night2(method: str, base, state_dir, carried: bool):
    """Night 2: a fresh plugin (a new process builds it from the config), with or without night 1's state."""
    plugin = _plugin_cases()[method]()
    if carried:
        load_plugin_states([plugin], state_dir)
    model = copy.deepcopy(base)
    run_task(model, 1, [plugin], steps=6)
    return model, plugin


@pytest.mark.parametrize("method", ["ewc", "seekr", "olora", "lwf", "averaging"])
def test_night_two_trains_with_the_state_night_one_stored(method, tmp_path):
    night1_plugin = _plugin_cases()[method]()
    night1 = lora_model() if method == "olora" else tiny_model()
    run_task(night1, 0, [night1_plugin], steps=8)
    save_plugin_states([night1_plugin], tmp_path)  # what the version's checkpoint holds
    carried, _ = _night2(method, night1, tmp_path, carried=True)
    dropped, _ = _night2(method, night1, tmp_path, carried=False)
    gap = max((a - b).abs().max().item() for a, b in zip(carried.parameters(), dropped.parameters()))
    if method in ("lwf", "averaging"):
        # No state crosses a task: LwF's teacher and averaging's previous model are the model the night
        # starts from, the continued version itself.
        assert night1_plugin.state_dict().tensors == {} and gap == 0
    else:
        assert gap > 1e-4, f"{method}: night 2 trained the same with and without night 1's state"


def test_ewc_penalty_of_night_two_is_zero_at_night_ones_anchor_and_grows_with_its_fisher(tmp_path):
    night1_plugin = _plugin_cases()["ewc"]()
    model = tiny_model()
    run_task(model, 0, [night1_plugin], steps=8)
    save_plugin_states([night1_plugin], tmp_path)
    plugin = _plugin_cases()["ewc"]()
    load_plugin_states([plugin], tmp_path)
    ctx = context(model, 1)
    plugin.before_task(ctx)
    batch = {"input_ids": torch.tensor([ctx.train_examples[0]["input_ids"]])}
    assert float(plugin.extra_loss(model, batch, None).detach()) == 0.0  # night 2 starts at the anchor
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    moved = float(plugin.extra_loss(model, batch, None).detach())
    fresh = _plugin_cases()["ewc"]()
    fresh.before_task(ctx)
    assert moved > 0 and fresh.extra_loss(model, batch, None) is None  # without night 1's state: no penalty at all
    # the penalty is night 1's Fisher-weighted distance: a stored Fisher twice as large doubles it
    state = night1_plugin.state_dict()
    doubled = _plugin_cases()["ewc"]()
    doubled.load_state_dict(PluginState({name: 2 * value if name.startswith("fisher.") else value
                                         for name, value in state.tensors.items()}, state.meta))
    doubled.before_task(ctx)
    assert float(doubled.extra_loss(model, batch, None).detach()) == pytest.approx(2 * moved, rel=1e-5)
