"""Tied word embeddings (lm_head and the input embeddings are one tensor): for every tuning method the
model exported from disk is the model that was trained, and a resumed checkpoint restores it."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from models.engine import train
from models.loading import load_model_and_tokenizer, save_model
from models.tiny import train_tokenizer
from models.tuning import apply_tuning, merge_for_export
from perennial import demo_data
from perennial.config import OptimConfig, TuningConfig
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

HEAD_AND_ATTENTION = ["q_proj", "v_proj", "lm_head"]
METHODS = {
    "full": TuningConfig(method="full"),
    "lora-lm_head": TuningConfig(method="lora", r=4, target_modules=HEAD_AND_ATTENTION),
    "lora-embed_tokens": TuningConfig(method="lora", r=4, target_modules=["q_proj", "embed_tokens"]),
    "mora-lm_head": TuningConfig(method="mora", r=4, target_modules=HEAD_AND_ATTENTION),
    "osf-lm_head": TuningConfig(method="osf", target_modules=HEAD_AND_ATTENTION),
    "attn-proj": TuningConfig(method="attn-proj"),
    "mlp-gate-up": TuningConfig(method="mlp-gate-up"),
    "regex-lm_head": TuningConfig(method="regex", trainable_regex=[r"^lm_head\."]),
    "regex-embed_tokens": TuningConfig(method="regex", trainable_regex=[r"embed_tokens", r"layers\.0\.mlp\.down_proj"]),
}
# Adapters on one of the two tied modules: that module gets its own copy, the export is saved untied.
UNTIED_ON_EXPORT = {"lora-lm_head", "lora-embed_tokens", "mora-lm_head", "osf-lm_head"}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(demo_data.general_corpus(200, 0), vocab_size=100)


def tied_llama(vocab: int) -> transformers.LlamaForCausalLM:
    return tiny_model("llama", vocab_size=vocab, attn_implementation=None, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=True)


def examples(vocab: int, count: int = 24) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(4, vocab, (int(torch.randint(6, 14, (1,), generator=generator)),), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


@pytest.mark.parametrize("case", list(METHODS))
def test_export_of_a_tied_model_is_the_trained_model(case, tokenizer, tmp_path):
    tuning, vocab = METHODS[case], len(tokenizer)
    base = tied_llama(vocab)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    data = examples(vocab)
    # lr 1e-2 moves every trained tensor far enough that a merge into the wrong tensor shows by whole logits.
    cfg = OptimConfig(lr=1e-2, max_steps=4, batch_size=4, warmup_steps=0, schedule="constant", checkpoint_every=2)
    model = apply_tuning(copy.deepcopy(base), tuning)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    saved = []
    train(model, data, cfg, seed=0, pad_token_id=0, checkpoint_dir=tmp_path / "checkpoints",
          checkpoint_fn=lambda step, path: saved.append(path))
    for name, parameter in model.named_parameters():
        if name in before:
            assert not torch.equal(parameter, before[name]), f"{case}: {name} was not trained"

    trained = {name: p.detach().clone() for name, p in model.named_parameters()}  # merging changes `model` in place
    ids = torch.tensor([tokenizer.encode("the farmer walked to the river and back")])
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
        trained_embeddings = model.get_input_embeddings()(ids)  # through an embed_tokens adapter, if any
        save_model(merge_for_export(model), tokenizer, tmp_path / "export")
        exported, _ = load_model_and_tokenizer(tmp_path / "export")
        torch.testing.assert_close(exported(input_ids=ids).logits, trained_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(exported.get_input_embeddings()(ids), trained_embeddings, atol=1e-6, rtol=0)
    is_tied = exported.lm_head.weight is exported.model.embed_tokens.weight
    assert is_tied == (case not in UNTIED_ON_EXPORT) == exported.config.tie_word_embeddings

    # The mid-stage checkpoint (safetensors: one name per tensor) restores the same model on a fresh copy.
    resumed = apply_tuning(copy.deepcopy(base), tuning)
    train(resumed, data, cfg, seed=0, pad_token_id=0, resume_from=saved[0])
    assert [name for name, _ in resumed.named_parameters()] == list(trained)
    for name, parameter in resumed.named_parameters():
        assert torch.equal(parameter, trained[name]), f"{case}: {name} differs after resuming from {saved[0].name}"
    if case not in UNTIED_ON_EXPORT:
        assert resumed.get_output_embeddings().weight is resumed.get_input_embeddings().weight


@pytest.mark.parametrize("method", ["mora", "osf"])
def test_a_tuner_refused_on_a_tied_embedding_leaves_the_tie_alone(method):
    """MoRA and OSF wrap nn.Linear only: pointed at the embedding they are refused before anything is
    untied (OSF used to pass over it without a word), and the model stays tied."""
    base = tied_llama(100)
    with pytest.raises(ValueError, match="does not apply to embeddings"):
        apply_tuning(base, TuningConfig(method=method, r=4, target_modules=["q_proj", "embed_tokens"]))
    assert base.lm_head.weight is base.model.embed_tokens.weight and base.config.tie_word_embeddings
