"""apply_tuning: each method trains exactly what it names, and nothing else moves."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from peft import PeftModel

from models.tuning import apply_tuning, count_parameters, merge_for_export, trainable_parameter_names
from perennial.config import TuningConfig
from tests.tiny_models import tiny_model

NUM_LAYERS = 2


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    return tiny_model("llama", vocab_size=64, seed=seed, attn_implementation=None, num_hidden_layers=NUM_LAYERS,
                      num_key_value_heads=4, max_position_embeddings=2048)


def fixed_batch() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def three_adamw_steps(model: torch.nn.Module) -> None:
    # Every parameter goes to the optimizer, so a frozen one can only stay put because it gets no gradient.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids = fixed_batch()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()


def module_name(parameter_name: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'up_proj'."""
    return parameter_name.split(".")[-2]


def assert_exactly_these_change(tuning: TuningConfig, expected: set[str]) -> None:
    model = apply_tuning(tiny_llama(), tuning)
    assert set(trainable_parameter_names(model)) == expected
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    three_adamw_steps(model)
    for name, parameter in model.named_parameters():
        if name in expected:
            assert not torch.equal(parameter, before[name]), f"{name} should have been trained"
        else:
            assert torch.equal(parameter, before[name]), f"{name} should be bit-identical"


def all_names() -> list[str]:
    return [name for name, _ in tiny_llama().named_parameters()]


def test_attn_proj_trains_only_the_attention_projections():
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    expected = {n for n in all_names() if ".self_attn." in n and module_name(n) in attention}
    assert len(expected) == 4 * NUM_LAYERS
    assert_exactly_these_change(TuningConfig(method="attn-proj"), expected)


def test_mlp_gate_up_trains_gate_and_up_but_not_down():
    expected = {n for n in all_names() if module_name(n) in {"gate_proj", "up_proj"}}
    assert len(expected) == 2 * NUM_LAYERS
    assert_exactly_these_change(TuningConfig(method="mlp-gate-up"), expected)


def test_regex_trains_only_matching_names():
    patterns = [r"layers\.1\.mlp\.down_proj", r"^lm_head\."]
    expected = {"model.layers.1.mlp.down_proj.weight", "lm_head.weight"}
    assert expected <= set(all_names())
    assert_exactly_these_change(TuningConfig(method="regex", trainable_regex=patterns), expected)


def test_full_trains_everything():
    model = tiny_llama()
    model.requires_grad_(False)
    model = apply_tuning(model, TuningConfig(method="full"))
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in tiny_llama().parameters())


@pytest.mark.parametrize("method,adapter_marker", [("lora", ".lora_"), ("mora", ".mora_M."), ("osf", ".osf_")])
def test_peft_methods_train_only_adapter_parameters(method, adapter_marker):
    targets = ["q_proj", "v_proj"]
    model = apply_tuning(tiny_llama(), TuningConfig(method=method, r=4, target_modules=targets))
    assert isinstance(model, PeftModel)
    names = trainable_parameter_names(model)
    assert names and all(adapter_marker in name for name in names)
    adapted_modules = {name.split(adapter_marker)[0].rsplit(".", 1)[-1] for name in names}
    assert adapted_modules == set(targets)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total

    input_ids = fixed_batch()
    three_adamw_steps(model)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        exported = merge_for_export(model)
        assert not isinstance(exported, PeftModel)
        assert not any(adapter_marker in name for name, _ in exported.named_parameters())
        torch.testing.assert_close(exported(input_ids=input_ids).logits, adapted, atol=1e-5, rtol=0)


def test_mora_auto_resolves_by_rank():
    small = apply_tuning(tiny_llama(), TuningConfig(method="mora", r=8, mora_type="auto"))
    large = apply_tuning(tiny_llama(), TuningConfig(method="mora", r=32, mora_type="auto"))
    assert small.peft_config["default"].mora_type == "rotation"
    assert large.peft_config["default"].mora_type == "sharing"


def test_lora_uses_rank_alpha_and_dropout():
    tuning = TuningConfig(method="lora", r=4, alpha=8.0, dropout=0.1, target_modules=["q_proj"])
    config = apply_tuning(tiny_llama(), tuning).peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.1)
    assert config.target_modules == {"q_proj"}


def test_merge_for_export_leaves_plain_models_alone():
    model = apply_tuning(tiny_llama(), TuningConfig(method="attn-proj"))
    assert merge_for_export(model) is model


class NoProjections(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)


@pytest.mark.parametrize(
    "tuning,pattern_in_message",
    [
        (TuningConfig(method="attn-proj"), "q_proj"),
        (TuningConfig(method="mlp-gate-up"), "gate_proj"),
        (TuningConfig(method="regex", trainable_regex=["decoder"]), "decoder"),
    ],
)
def test_selective_preset_matching_nothing_is_an_error(tuning, pattern_in_message):
    with pytest.raises(ValueError) as raised:
        apply_tuning(NoProjections(), tuning)
    message = str(raised.value)
    assert "NoProjections" in message and pattern_in_message in message and tuning.method in message


def test_invalid_regex_is_a_clear_error():
    with pytest.raises(ValueError, match=r"invalid regex '\(unclosed'"):
        apply_tuning(tiny_llama(), TuningConfig(method="regex", trainable_regex=["(unclosed"]))


def test_osf_missing_from_peft_names_the_version(monkeypatch):
    monkeypatch.delattr(peft, "OSFConfig")
    with pytest.raises(ValueError, match=rf"osf.*peft {peft.__version__}"):
        apply_tuning(tiny_llama(), TuningConfig(method="osf"))
