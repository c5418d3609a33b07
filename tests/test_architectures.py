"""Every tuning method means the same thing on every supported decoder family (issue #38, point 1).

The matrix trains each method a few steps on a tiny random-weight model of each family
(tests/tiny_models.py), then checks exactly which tensors of the exported model differ from the input
model, and that the export reloads with the trained model's logits. The expected modules per
family are written out here, apart from models/families.py, so the resolution itself is tested.
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from models.data import encode_instruction
from models.engine import train
from models.families import projections
from models.loading import load_causal_lm, save_model
from models.tuning import apply_tuning, merge_for_export, plan_tuning
from perennial.config import OptimConfig, TuningConfig
from tests.tiny_models import FAMILIES, tiny

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LLAMA_NAMES = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "gate_up": ["gate_proj", "up_proj"], "down": ["down_proj"]}
# family -> the modules (name suffixes) computing the attention projections, the MLP's gate and up, and its down.
EXPECTED_MODULES = {
    "llama": LLAMA_NAMES, "qwen2": LLAMA_NAMES, "qwen2-untied": LLAMA_NAMES, "gemma2": LLAMA_NAMES, "mistral": LLAMA_NAMES,
    "phi3": {"attention": ["qkv_proj", "o_proj"], "gate_up": ["gate_up_proj"], "down": ["down_proj"]},
    "gpt_neox": {"attention": ["query_key_value", "attention.dense"], "gate_up": ["dense_h_to_4h"], "down": ["dense_4h_to_h"]},
    "gpt2": {"attention": ["c_attn", "attn.c_proj"], "gate_up": ["c_fc"], "down": ["mlp.c_proj"]},
    "falcon": {"attention": ["query_key_value", "self_attention.dense"], "gate_up": ["dense_h_to_4h"], "down": ["dense_4h_to_h"]},
}
METHODS = ["full", "attn-proj", "mlp-gate-up", "lora", "mora", "osf"]
# MoRA and OSF wrap nn.Linear only; GPT-2's projections are transformers' Conv1D.
REFUSED = {("gpt2", "mora"), ("gpt2", "osf")}
OPTIM = OptimConfig(lr=1e-2, max_steps=2, batch_size=2, warmup_steps=0, max_length=32, schedule="constant")


def under(name: str, modules: list[str]) -> bool:
    """Whether parameter ``name`` belongs to one of ``modules`` (suffixes of module paths, on whole components)."""
    module = name.rsplit(".", 1)[0]
    return any(module == m or module.endswith("." + m) for m in modules)


def expected_changes(family: str, method: str, names: list[str]) -> set[str]:
    modules = EXPECTED_MODULES[family]
    if method == "full":
        return set(names)
    if method == "attn-proj":
        return {n for n in names if under(n, modules["attention"])}
    if method == "mlp-gate-up":
        return {n for n in names if under(n, modules["gate_up"])}
    # The adapters change each projection's weight (the merged update), never its bias.
    every = modules["attention"] + modules["gate_up"] + modules["down"]
    return {n for n in names if n.endswith(".weight") and under(n, every)}


def examples(tokenizer) -> list[dict]:
    pairs = [("What is 2+2?", "Four."), ("And times 3?", "Twelve."), ("Say hello.", "Hello!"), ("Be brief.", "Fine.")]
    return [encode_instruction(tokenizer, prompt, response, OPTIM.max_length) for prompt, response in pairs]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(EXPECTED_MODULES))
def test_each_method_trains_its_weights_on_each_family_and_exports_them(family, method, tmp_path):
    model, tokenizer = tiny(family)
    tuning = TuningConfig(method=method, r=4)
    if (family, method) in REFUSED:
        with pytest.raises(ValueError, match=r"nn\.Linear layers only.*Conv1D.*use lora"):
            apply_tuning(model, tuning)
        return
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters(remove_duplicate=False)}
    tuned = apply_tuning(model, tuning)
    train(tuned, examples(tokenizer), OPTIM, seed=0, pad_token_id=tokenizer.pad_token_id)

    save_model(merge_for_export(tuned), tokenizer, tmp_path / "export")
    reloaded = load_causal_lm(tmp_path / "export")
    after = dict(reloaded.named_parameters(remove_duplicate=False))
    assert set(after) == set(names)
    changed = {name for name in names if not torch.equal(after[name], before[name])}
    assert changed == expected_changes(family, method, names)

    ids = torch.tensor([examples(tokenizer)[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_resolves_every_projection_role(family):
    """The whole table, trained or not: each role found in every layer, and peft's own LoRA defaults among them."""
    model, _ = tiny(family)
    found = [p for p in projections(model) if p.paths]
    assert {len(p.paths) for p in found} == {2}  # every named projection in both layers
    roles = {role for p in found for role in p.roles}
    assert roles >= {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    for peft_default in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type, []):
        assert any(p.name.split(".")[-1] == peft_default for p in found), peft_default


def test_adapter_on_part_of_a_fused_layer_adapts_it_whole_and_says_so(caplog):
    model, _ = tiny("phi3")
    tuning = TuningConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"])
    plan = plan_tuning(model, tuning)
    assert plan.targets == ("qkv_proj",)
    (note,) = plan.notes
    assert "qkv_proj" in note and "k_proj" in note and "whole" in note
    assert plan.params()["tuning.targets"] == "qkv_proj" and note in plan.params()["tuning.notes"]
    with caplog.at_level(logging.WARNING, logger="models.tuning"):
        tuned = apply_tuning(model, tuning)
    assert note in caplog.text
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in tuned.named_parameters() if p.requires_grad} == {"qkv_proj"}


def test_a_family_without_an_mlp_gate_trains_its_up_projection_and_says_so():
    model, _ = tiny("gpt_neox")
    plan = plan_tuning(model, TuningConfig(method="mlp-gate-up"))
    assert plan.targets == ("dense_h_to_4h",)
    assert "gate_proj" in plan.notes[0]
    with pytest.raises(ValueError, match=r"no module computes gate_proj"):
        plan_tuning(model, TuningConfig(method="lora", target_modules=["gate_proj"]))


def test_some_roles_matched_and_others_not_is_an_error_not_a_partial_success():
    model, _ = tiny("llama")
    attention = model.model.layers[1].self_attn
    attention.out_proj = attention.o_proj  # layer 1 names its output projection otherwise
    del attention.o_proj
    for tuning in (TuningConfig(method="attn-proj"), TuningConfig(method="lora")):
        with pytest.raises(ValueError, match=r"some of the projections matched.*o_proj: 1"):
            apply_tuning(model, tuning)


def test_unknown_layout_is_refused_naming_what_was_looked_for_and_what_to_set():
    model, _ = tiny("gpt_neox")
    type(model.config).model_type = "my_neox"  # a family models/families.py does not list
    try:
        for method in ("attn-proj", "lora", "osf"):
            with pytest.raises(ValueError) as raised:
                apply_tuning(model, TuningConfig(method=method))
            message = str(raised.value)
            assert "q_proj" in message and "query_key_value" in message and "tuning.target_modules" in message
            assert "trainable_regex" in message
    finally:
        type(model.config).model_type = "gpt_neox"


def test_a_target_matching_nothing_is_an_error():
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match=r"'qkv_proj' matches no module"):
        apply_tuning(model, TuningConfig(method="lora", target_modules=["q_proj", "qkv_proj"]))
    phi3, _ = tiny("phi3")  # Llama names in a regex: o_proj matches, q_proj does not
    with pytest.raises(ValueError, match=r"matched nothing for \['q_proj'\]"):
        apply_tuning(phi3, TuningConfig(method="regex", trainable_regex=["q_proj", "o_proj"]))
    assert all(p.requires_grad for p in phi3.parameters())  # refused before anything was frozen


@pytest.mark.parametrize("method", ["osf", "mora"])
def test_linear_only_tuner_on_an_embedding_says_it_does_not_apply_to_embeddings(method):
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match=r"does not apply to embeddings.*embed_tokens"):
        apply_tuning(model, TuningConfig(method=method, target_modules=["embed_tokens"]))
