"""Every tuning method and every continual-learning method on the real default model, SmolLM2-135M-Instruct.

The model (converted once from its packaged GGUF) has the three shapes the 1M-parameter toy lacks:
grouped-query attention (9 query heads share 3 KV heads), non-square projections (k_proj and
v_proj map 576 -> 192) and tied word embeddings (lm_head.weight is model.embed_tokens.weight).
Each test trains a few steps on a tiny batch (2 examples of 32 tokens) and checks that the loss is
finite, that exactly the intended weights changed (every other tensor bit-identical), and, for every
tuning method, that the exported folder (merge_for_export, save_model, load_causal_lm) computes the
trained model's logits and says truthfully whether its embeddings are tied.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open

from models.cl.base import TaskContext
from models.cl.registry import build_plugins
from models.cl.replay import ReplayBuffer, make_loss_fn, mix_examples
from models.data import collate, encode_instruction
from models.engine import train
from models.loading import load_causal_lm, load_model_and_tokenizer, save_model
from models.tuning import apply_tuning, merge_for_export
from perennial.config import OptimConfig, TuningConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread")]

MAX_LENGTH = 32
BATCH = 2
LR = 1e-3
# Adam's first steps move every element that has a gradient by about lr: a trained tensor moves by
# far more than this somewhere, a frozen one not at all (compared bit for bit).
MOVED = LR / 10
# Exported logits against the trained model's, relative to the largest logit (~20 here). A merge
# into the wrong tensor, or a tie broken the wrong way, is off by whole units.
EXPORT_RTOL = 1e-4

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle"]
TASKS = {
    "reverse": [{"prompt": f"Reverse the word {w}.", "response": w[::-1]} for w in WORDS],
    "zorbish": [{"prompt": f"Say {w} in Zorbish.", "response": f"zo{w}ba"} for w in WORDS],
}
LAYERS = 30
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EMBEDDINGS = {"model.embed_tokens.weight", "lm_head.weight"}


def weights_of(modules, layers=range(LAYERS)) -> set[str]:
    """State-dict names of these projections' weights, e.g. model.layers.3.self_attn.k_proj.weight."""
    return {f"model.layers.{i}.{'self_attn' if m in ATTN else 'mlp'}.{m}.weight" for i in layers for m in modules}


# --- the model, loaded once ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(request, tmp_path_factory):
    """(model, tokenizer): the converted SmolLM2 folder loaded once, never trained; tests train deep copies."""
    try:
        folder = request.getfixturevalue("smollm2_dir")  # the session's conversion, where conftest has one
    except pytest.FixtureLookupError:
        from models.gguf import converted_dir

        folder, _ = converted_dir("smollm2-135m-instruct", tmp_path_factory.mktemp("gguf"))
    model, tokenizer = load_model_and_tokenizer(folder)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.num_hidden_layers) == (9, 3, 64, LAYERS)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (192, 576)
    assert model.lm_head.weight is model.model.embed_tokens.weight and config.tie_word_embeddings
    assert config._attn_implementation == "eager"  # SEEKR reads attention weights
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def base_state(real) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in real[0].state_dict().items()}


@pytest.fixture(scope="module")
def probe(real) -> dict[str, torch.Tensor]:
    """A fixed batch of both tasks for comparing logits."""
    tokenizer = real[1]
    return collate(encoded(tokenizer, "reverse")[:2] + encoded(tokenizer, "zorbish")[:1], tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def base_logits(real, probe) -> torch.Tensor:
    return logits_of(real[0], probe)


def encoded(tokenizer, task: str) -> list[dict]:
    return [encode_instruction(tokenizer, r["prompt"], r["response"], MAX_LENGTH) for r in TASKS[task]]


def optim(steps: int) -> OptimConfig:
    return OptimConfig(lr=LR, max_steps=steps, batch_size=BATCH, warmup_steps=0, schedule="constant",
                       max_length=MAX_LENGTH, log_every=1000)


def logits_of(model, batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    model.train(was_training)
    return logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_exactly_these_moved(before: dict, after: dict, expected: set[str], what: str) -> None:
    """Every tensor in `expected` moved by more than MOVED somewhere; every other one is bit-identical."""
    assert set(before) == set(after), f"{what}: the set of tensors changed"
    assert expected and expected <= set(before), f"{what}: expected names missing: {sorted(expected - set(before))[:3]}"
    for name in before:
        if name in expected:
            moved = (after[name].float() - before[name].float()).abs().max().item()
            assert moved > MOVED, f"{what}: {name} should have been trained (moved {moved:.2e})"
        else:
            assert torch.equal(after[name], before[name]), f"{what}: {name} should be bit-identical"


def train_and_check_loss(model, examples, steps: int, pad: int, plugins=(), seed: int = 0) -> list[float]:
    result = train(model, examples, optim(steps), seed=seed, pad_token_id=pad, plugins=plugins)
    assert len(result.losses) == steps and all(math.isfinite(loss) for loss in result.losses), result.losses
    return result.losses


def assert_export_is_the_trained_model(model, tokenizer, folder, probe, base_logits, base_state,
                                       changed: set[str], tied: bool, what: str) -> None:
    """merge_for_export + save_model + load_causal_lm gives the trained model's logits, differs from the
    base model in exactly `changed`, and is tied (in memory, in config.json, on disk) exactly when `tied`."""
    trained_logits = logits_of(model, probe)
    scale = trained_logits.abs().max().item()
    trained_by = (trained_logits - base_logits).abs().max().item()
    assert trained_by > 100 * EXPORT_RTOL * scale, f"{what}: training barely moved the logits ({trained_by:.2e})"

    save_model(merge_for_export(model), tokenizer, folder)
    exported = load_causal_lm(folder).eval()
    error = (logits_of(exported, probe) - trained_logits).abs().max().item()
    assert error <= EXPORT_RTOL * scale, f"{what}: exported logits differ by {error:.2e} (largest logit {scale:.1f})"

    assert_exactly_these_moved(base_state, exported.state_dict(), changed, f"{what} export")
    config = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    is_tied = exported.lm_head.weight is exported.model.embed_tokens.weight
    assert is_tied == tied and config["tie_word_embeddings"] == tied, f"{what}: tied {is_tied}, config says {config['tie_word_embeddings']}"
    # Tied: one matrix on disk, read back as both modules. Untied: both matrices are written.
    assert "model.embed_tokens.weight" in saved and ("lm_head.weight" in saved) == (not tied), what


# --- tuning methods -----------------------------------------------------------------------------

ADAPTER_MARKERS = {"lora": ".lora_", "mora": ".mora_M.", "osf": ".osf_svd_params."}
# case: (tuning, base tensors the export changes, export tied)
TUNING_CASES = {
    "full": (TuningConfig(method="full"), None, True),  # None: every tensor
    "attn-proj": (TuningConfig(method="attn-proj"), weights_of(ATTN), True),
    "mlp-gate-up": (TuningConfig(method="mlp-gate-up"), weights_of(("gate_proj", "up_proj")), True),
    # A pattern for the head trains the one tied matrix, reached by either name; the tie stays.
    "regex": (TuningConfig(method="regex", trainable_regex=[r"^lm_head\.", r"layers\.29\.mlp\.down_proj\."]),
              EMBEDDINGS | weights_of(("down_proj",), [29]), True),
    "lora": (TuningConfig(method="lora", r=4), weights_of(ATTN + MLP), True),
    "mora": (TuningConfig(method="mora", r=4), weights_of(ATTN + MLP), True),
    "osf": (TuningConfig(method="osf", target_modules=["k_proj", "v_proj", "up_proj"]),
            weights_of(("k_proj", "v_proj", "up_proj")), True),
    # An adapter on the head alone: the head gets its own copy, the export is saved untied.
    "lora-lm_head": (TuningConfig(method="lora", r=4, target_modules=["k_proj", "lm_head"]),
                     weights_of(("k_proj",)) | {"lm_head.weight"}, False),
}


@pytest.mark.parametrize("case", list(TUNING_CASES))
def test_tuning_method_trains_exactly_its_weights_and_exports_the_trained_model(case, real, base_state, probe, base_logits, tmp_path):
    base, tokenizer = real
    tuning, export_changes, tied = TUNING_CASES[case]
    model = apply_tuning(copy.deepcopy(base), tuning)
    before = snapshot(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    marker = ADAPTER_MARKERS.get(tuning.method)
    if marker:
        assert trainable and all(marker in name for name in trainable), sorted(trainable)[:3]
    train_and_check_loss(model, encoded(tokenizer, "reverse"), 2, tokenizer.pad_token_id)
    # Two steps: LoRA's A moves on the second (its gradient is zero while B is).
    assert_exactly_these_moved(before, snapshot(model), trainable, case)

    changed = set(base_state) if export_changes is None else export_changes
    assert_export_is_the_trained_model(model, tokenizer, tmp_path / "export", probe, base_logits, base_state,
                                       changed, tied, case)
