"""The real loading path (AutoModel/AutoTokenizer) on local model directories the test creates."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.data import DEFAULT_PROMPT_TEMPLATE, render_prompt
from models.loading import ModelLoadError, load_model_and_tokenizer, save_model
from models.tiny import train_tokenizer
from perennial import demo_data


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(demo_data.general_corpus(200, 0), vocab_size=300)


def small_model(vocab):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))


def test_local_directory_round_trips(tmp_path, tokenizer):
    model = small_model(len(tokenizer))
    save_model(model, tokenizer, tmp_path)
    loaded, loaded_tokenizer = load_model_and_tokenizer(tmp_path)
    ids = torch.tensor([tokenizer.encode("the farmer walked")])
    assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)  # sdpa there, eager here
    assert loaded_tokenizer.encode("the farmer walked") == tokenizer.encode("the farmer walked")


def test_directory_without_weights_is_refused(tmp_path, tokenizer):
    save_model(small_model(len(tokenizer)), tokenizer, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model_and_tokenizer(tmp_path)


def test_pickle_only_weights_are_refused(tmp_path, tokenizer):
    model = small_model(len(tokenizer))
    save_model(model, tokenizer, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model_and_tokenizer(tmp_path)


def test_mismatched_tokenizer_is_refused(tmp_path, tokenizer):
    save_model(small_model(64), tokenizer, tmp_path)  # 64-row embedding table, 300-token tokenizer
    with pytest.raises(ModelLoadError, match="do not belong together"):
        load_model_and_tokenizer(tmp_path)


def test_missing_hub_model_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((ModelLoadError, OSError)):
        load_model_and_tokenizer("perennial-tests/no-such-model")


def test_chat_template_used_when_present_else_default(tokenizer):
    assert render_prompt(tokenizer, "hi") == DEFAULT_PROMPT_TEMPLATE.format(prompt="hi")
    templated = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    templated.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    assert render_prompt(templated, "hi") == "<|user|>hi<|assistant|>"
