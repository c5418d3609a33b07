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
from models.cl.olora import lora_layers
from models.cl.registry import build_plugins
from models.cl.replay import ReplayBuffer, make_loss_fn, mix_examples
from models.cl.seekr import attention_maps
from models.data import collate, encode_instruction
from models.engine import train
from models.loading import load_causal_lm, load_model_and_tokenizer, save_model
from models.tuning import apply_tuning, merge_for_export
from perennial.config import OptimConfig, TuningConfig

pytestmark = pytest.mark.slow  # no single_torch_thread: run alone, the real model trains 1.3x faster on two threads (fp32)

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
    # the precision `make run` trains the default model in (bf16 autocast on a native-bf16 CPU)
    result = train(model, examples, optim(steps), seed=seed, pad_token_id=pad, plugins=plugins, precision="auto")
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
    # OSF's SVD of every target costs ~18 s for all seven projections; k_proj (576 -> 192) and up_proj
    # (576 -> 1536) cover both non-square cases of its gradient projection.
    "osf": (TuningConfig(method="osf", target_modules=["k_proj", "up_proj"]), weights_of(("k_proj", "up_proj")), True),
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
    # LoRA's A moves on the second step (its gradient is zero while B is); one step moves the rest.
    train_and_check_loss(model, encoded(tokenizer, "reverse"), 2 if tuning.method == "lora" else 1, tokenizer.pad_token_id)
    assert_exactly_these_moved(before, snapshot(model), trainable, case)

    changed = set(base_state) if export_changes is None else export_changes
    assert_export_is_the_trained_model(model, tokenizer, tmp_path / "export", probe, base_logits, base_state,
                                       changed, tied, case)



def test_a_tuner_that_adapts_no_tied_module_keeps_the_model_tied(real):
    """MoRA and OSF wrap nn.Linear only: pointed at the embedding they are refused (OSF used to pass over it
    silently), and neither may leave SmolLM2 untied."""
    base, _ = real
    for method in ("mora", "osf"):
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match="does not apply to embeddings"):
            apply_tuning(model, TuningConfig(method=method, r=4, target_modules=["k_proj", "embed_tokens"]))
        assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


# --- non-square projections: MoRA on k_proj / v_proj (576 -> 192) ------------------------------------


@pytest.mark.parametrize("mora_type", ["sharing", "rotation"])
def test_mora_on_the_non_square_kv_projections_trains_and_merges_exactly(mora_type, real, probe):
    base, tokenizer = real
    model = apply_tuning(copy.deepcopy(base), TuningConfig(method="mora", r=8, mora_type=mora_type, target_modules=["k_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    assert (layer.in_features, layer.out_features, layer.mora_M["default"].shape) == (576, 192, (78, 78))
    before = snapshot(model)
    train_and_check_loss(model, encoded(tokenizer, "reverse"), 2, tokenizer.pad_token_id)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * LAYERS
    assert_exactly_these_moved(before, snapshot(model), trainable, f"mora {mora_type}")

    # Every input feature of the 576 reaches the trained update (cutting dropped 342 under rotation).
    delta = layer.get_delta_weight("default")
    assert delta.shape == (192, 576) and int((delta.abs().sum(0) == 0).sum()) == 0
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(x @ delta.T, layer(x) - layer.base_layer(x), atol=1e-6, rtol=1e-5)

    adapted = logits_of(model, probe)
    merged = logits_of(merge_for_export(model), probe)
    error = (merged - adapted).abs().max().item()
    assert error <= 1e-5 * adapted.abs().max().item(), f"merged logits differ by {error:.2e}"


# --- continual-learning methods, built from their configs as tasks/cit.py builds them --------------


def task_context(model, tokenizer, index: int, task: str) -> TaskContext:
    return TaskContext(task_index=index, task_name=task, model=model, train_examples=encoded(tokenizer, task),
                       pad_token_id=tokenizer.pad_token_id)


def recorded(plugin) -> list[float | None]:
    """The plugin's extra loss at every micro-batch from now on (None where it adds nothing)."""
    values: list[float | None] = []
    extra_loss = plugin.extra_loss

    def recording(model, batch, outputs):
        value = extra_loss(model, batch, outputs)
        values.append(None if value is None else value.detach().float().item())
        return value

    plugin.extra_loss = recording
    return values


def run_task(model, tokenizer, plugins, index: int, task: str, steps: int) -> TaskContext:
    ctx = task_context(model, tokenizer, index, task)
    for plugin in plugins:
        plugin.before_task(ctx)
    train_and_check_loss(model, ctx.train_examples, steps, tokenizer.pad_token_id, plugins=plugins, seed=index)
    for plugin in plugins:
        plugin.after_task(ctx)
    return ctx


def test_replay_loss_mid_buffer_trains_with_the_next_task(real, base_state):
    base, tokenizer = real
    model = apply_tuning(copy.deepcopy(base), TuningConfig(method="attn-proj"))
    train_and_check_loss(model, encoded(tokenizer, "reverse"), 1, tokenizer.pad_token_id)
    encode = lambda r: encode_instruction(tokenizer, r["prompt"], r["response"], MAX_LENGTH)  # noqa: E731
    loss_fn = make_loss_fn(model, encode, tokenizer.pad_token_id)
    losses = loss_fn(TASKS["reverse"])
    assert len(losses) == len(WORDS) and all(math.isfinite(x) and x > 0 for x in losses)
    buffer = ReplayBuffer()
    buffer.add_task("reverse", TASKS["reverse"], budget=0.25, strategy="loss-mid", seed=0, loss_fn=loss_fn, quantile=0.2)
    kept = buffer.records()
    assert len(kept) == 2 and all(record in TASKS["reverse"] for record in kept)
    ranked = sorted(losses)
    assert all(ranked[0] < losses[TASKS["reverse"].index(r)] < ranked[-1] for r in kept)  # the easiest and hardest are left out

    examples = mix_examples(encoded(tokenizer, "zorbish"), [encode(r) for r in kept], mode="concat", seed=0)
    assert len(examples) == len(WORDS) + 2
    train_and_check_loss(model, examples, 2, tokenizer.pad_token_id, seed=1)
    assert_exactly_these_moved(base_state, model.state_dict(), weights_of(ATTN), "replay")


def test_ewc_penalty_on_the_real_model(real, base_state):
    base, tokenizer = real
    model = apply_tuning(copy.deepcopy(base), TuningConfig(method="attn-proj"))
    [ewc] = build_plugins([{"name": "ewc", "strength": 100.0, "fisher_samples": 2}], seed=0)
    run_task(model, tokenizer, [ewc], 0, "reverse", 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(ewc.fisher) == set(ewc.anchor) == trainable and len(trainable) == 4 * LAYERS
    assert all(torch.isfinite(f).all() and (f >= 0).all() for f in ewc.fisher.values())
    assert sum(float(f.sum()) for f in ewc.fisher.values()) > 0
    penalties = recorded(ewc)
    run_task(model, tokenizer, [ewc], 1, "zorbish", 2)
    # At the anchor the penalty is zero; once the weights leave it, it is positive.
    assert penalties[0] == 0.0 and penalties[1] > 0 and math.isfinite(penalties[1]), penalties
    assert_exactly_these_moved(base_state, model.state_dict(), weights_of(ATTN), "ewc")


def test_lwf_distils_from_a_frozen_teacher_under_lora(real):
    base, tokenizer = real
    model = apply_tuning(copy.deepcopy(base), TuningConfig(method="lora", r=4))
    before = snapshot(model)
    [lwf] = build_plugins([{"name": "lwf", "weight": 1.0, "temperature": 2.0}], seed=0)
    kl = recorded(lwf)
    ctx = task_context(model, tokenizer, 0, "reverse")
    lwf.before_task(ctx)
    teacher = lwf.teacher
    train_and_check_loss(model, ctx.train_examples, 2, tokenizer.pad_token_id, plugins=[lwf])
    # Step 1: the student is the teacher (KL 0 up to rounding); step 2: it has moved away.
    assert abs(kl[0]) < 1e-6 and kl[1] > 1e-6 and math.isfinite(kl[1]), kl
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, before[name]) for name, p in teacher.named_parameters())
    lwf.after_task(ctx)
    assert lwf.teacher is None
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name for name in trainable)
    assert_exactly_these_moved(before, snapshot(model), trainable, "lwf")


def test_averaging_interpolates_exactly_the_trained_weights(real, base_state):
    base, tokenizer = real
    model = apply_tuning(copy.deepcopy(base), TuningConfig(method="mlp-gate-up"))
    [averaging] = build_plugins([{"name": "averaging", "alpha": 0.5, "per_layer": {r"layers\.29\.": 0.8}}], seed=0)
    ctx = task_context(model, tokenizer, 0, "reverse")
    averaging.before_task(ctx)
    train_and_check_loss(model, ctx.train_examples, 2, tokenizer.pad_token_id, plugins=[averaging])
    trained = snapshot(model)
    averaging.after_task(ctx)
    expected = weights_of(("gate_proj", "up_proj"))
    for name, parameter in model.named_parameters():
        if name in expected:
            alpha = 0.8 if ".layers.29." in name else 0.5
            torch.testing.assert_close(parameter.detach(), alpha * base_state[name] + (1 - alpha) * trained[name], atol=1e-7, rtol=1e-6)
    assert_exactly_these_moved(base_state, model.state_dict(), expected, "averaging")


def test_olora_folds_each_task_and_keeps_later_subspaces_orthogonal(real, base_state, probe, base_logits, tmp_path):
    base, tokenizer = real
    model = apply_tuning(copy.deepcopy(base), TuningConfig(method="lora", r=4))
    [olora] = build_plugins([{"name": "olora", "lambda_orth": 0.5}], seed=0)
    ctx = task_context(model, tokenizer, 0, "reverse")
    olora.before_task(ctx)
    train_and_check_loss(model, ctx.train_examples, 2, tokenizer.pad_token_id, plugins=[olora])
    adapted = logits_of(model, probe)
    olora.after_task(ctx)
    # The fold moves the update into the base weights: the model's function is unchanged.
    error = (logits_of(model, probe) - adapted).abs().max().item()
    assert error <= 1e-5 * adapted.abs().max().item(), f"folding changed the logits by {error:.2e}"
    shapes = {name.rsplit(".", 1)[-1]: tuple(a.shape) for name, a in olora.old_a.items()}
    assert len(olora.old_a) == 7 * LAYERS
    assert shapes == {"q_proj": (4, 576), "k_proj": (4, 576), "v_proj": (4, 576), "o_proj": (4, 576),
                      "gate_proj": (4, 576), "up_proj": (4, 576), "down_proj": (4, 1536)}
    assert not any(module.lora_B[adapter].weight.detach().any() for _, module, adapter in lora_layers(model))  # the fold resets B for the next task

    penalties = recorded(olora)
    run_task(model, tokenizer, [olora], 1, "zorbish", 2)
    assert all(p is not None and math.isfinite(p) and p > 0 for p in penalties), penalties
    assert_export_is_the_trained_model(model, tokenizer, tmp_path / "export", probe, base_logits, base_state,
                                       weights_of(ATTN + MLP), True, "olora")


# --- grouped-query attention: SEEKR scores and distils query heads ------------------------------------


def test_seekr_scores_selects_and_distils_query_heads_under_gqa(real, base_state):
    """9 query heads share 3 KV heads. Attention maps are per query head (eager attention repeats K
    and V per group), so importance, selection, the stored teacher maps and the attention KL are per
    query head: heads of one KV group attend differently and are scored apart."""
    base, tokenizer = real
    config = base.config
    groups = config.num_attention_heads // config.num_key_value_heads
    model = apply_tuning(copy.deepcopy(base), TuningConfig(method="attn-proj"))
    [seekr] = build_plugins([{"name": "seekr", "samples_per_task": 2, "replay_batch_size": 2,
                              "layer_budget": 2, "head_budget": 4}], seed=0)
    run_task(model, tokenizer, [seekr], 0, "reverse", 1)

    assert seekr.importance.shape == (LAYERS, 9) and torch.isfinite(seekr.importance).all()
    assert float(seekr.importance.sum()) > 0
    # Scored per query head: within a KV group the three query heads get different scores.
    grouped = seekr.importance.view(LAYERS, config.num_key_value_heads, groups)
    assert (grouped.max(-1).values - grouped.min(-1).values > 0).float().mean() > 0.5
    assert len(seekr.selected) == 4 and len({layer for layer, _ in seekr.selected}) <= 2
    assert all(0 <= head < 9 for _, head in seekr.selected)

    maps = attention_maps(model, seekr.memory)
    for sample, sample_maps in zip(seekr.memory, maps):
        length = len(sample["input_ids"])
        assert sample_maps.shape == (LAYERS, 9, length, length)
        assert sample["attn"].shape == (4, length, length)
        torch.testing.assert_close(sample["attn"].sum(-1), torch.ones(4, length))  # attention rows
        for (layer, head), stored in zip(sample["heads"], sample["attn"]):
            torch.testing.assert_close(stored, sample_maps[layer, head], atol=1e-6, rtol=0)
            sibling = (head // groups) * groups + (head + 1) % groups  # same KV head, another query head
            assert (stored - sample_maps[layer, sibling]).abs().max() > 1e-3

    # The model is the teacher right after the task: the attention KL on the stored heads is zero.
    picked = seekr.memory[:2]
    replay = collate(picked, tokenizer.pad_token_id)
    with torch.no_grad():
        student = model(**replay, output_attentions=True)
    assert len(student.attentions) == LAYERS and student.attentions[0].shape[1] == 9
    assert abs(seekr._attention_kl(student.attentions, picked).item()) < 1e-5

    extra = recorded(seekr)
    run_task(model, tokenizer, [seekr], 1, "zorbish", 2)
    assert len(extra) == 2 and all(value is not None and math.isfinite(value) and value > 0 for value in extra), extra
    with torch.no_grad():
        student = model(**replay, output_attentions=True)
    drift = seekr._attention_kl(student.attentions, picked).item()
    assert math.isfinite(drift) and drift > 0
    assert seekr.importance.shape == (LAYERS, 9) and len(seekr.memory) == 4
    assert_exactly_these_moved(base_state, model.state_dict(), weights_of(ATTN), "seekr")
