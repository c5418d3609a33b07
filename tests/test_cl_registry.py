import pytest
from pydantic import ValidationError

from models.cl.averaging import AveragingPlugin
from models.cl.ewc import EWCPlugin
from models.cl.lwf import LwFPlugin
from models.cl.merge import MergePlugin
from models.cl.olora import OLoRAPlugin
from models.cl.registry import PLUGINS, build_plugins, check_requirements
from models.cl.seekr import SEEKRPlugin
from perennial.config import build_config


def test_every_configured_method_becomes_its_plugin_with_its_settings():
    cfg = build_config({"seed": 11, "cit": {"methods": [
        {"name": "ewc", "strength": 5.0},
        {"name": "lwf", "temperature": 3.0},
        {"name": "averaging", "alpha": 0.2, "per_layer": {"lm_head": 0.9}},
        {"name": "seekr", "head_budget": 6, "samples_per_task": 10},
        {"name": "olora", "lambda_orth": 0.1},
        {"name": "merge", "coefficients": [0.5, 1.0], "validation_records": 12},
    ]}})
    plugins = build_plugins(cfg.cit.methods, seed=cfg.seed)
    assert [type(p) for p in plugins] == [EWCPlugin, LwFPlugin, AveragingPlugin, SEEKRPlugin, OLoRAPlugin, MergePlugin]
    ewc, lwf, averaging, seekr, olora, merge = plugins
    assert (merge.coefficients, merge.validation_records, merge.tolerance) == ([0.5, 1.0], 12, 0.02)
    assert (ewc.strength, ewc.fisher_samples, ewc.decay, ewc.seed) == (5.0, 64, 1.0, 11)
    assert (lwf.weight, lwf.temperature) == (1.0, 3.0)
    assert averaging.alpha_for("lm_head.weight") == 0.9 and averaging.alpha_for("model.norm.weight") == 0.2
    assert (seekr.head_budget, seekr.layer_budget, seekr.samples_per_task, seekr.needs_attentions) == (6, 2, 10, True)
    assert (olora.lambda_orth, olora.lambda_l2) == (0.1, 0.0)
    assert {p.name for p in plugins} == set(PLUGINS)
    assert build_plugins([]) == []


def test_plain_dicts_are_validated_like_the_yaml_config():
    assert isinstance(build_plugins([{"name": "lwf", "weight": 0.5}])[0], LwFPlugin)
    with pytest.raises(ValidationError):
        build_plugins([{"name": "lwf", "wieght": 0.5}])
    with pytest.raises(ValidationError):
        build_plugins([{"name": "gem"}])


def test_impossible_method_and_model_combinations_are_refused_up_front():
    check_requirements([{"name": "seekr"}], tuning_method="full", attn_implementation="eager")
    check_requirements([{"name": "olora"}, {"name": "ewc"}], tuning_method="lora", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="eager"):
        check_requirements([{"name": "seekr"}], tuning_method="full", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="lora"):
        check_requirements([{"name": "olora"}], tuning_method="full", attn_implementation="eager")
