"""The real loading path (AutoModel/AutoTokenizer) on local model directories and on a Hugging Face
hub cache the tests create (hub ids resolved offline, as Perennial runs by default)."""

import hashlib
import os
import shutil

import pytest
import torch
from huggingface_hub import constants as hub_constants
from transformers import LlamaConfig, LlamaForCausalLM

from models.data import DEFAULT_PROMPT_TEMPLATE, render_prompt
from models.loading import ModelLoadError, load_model_and_tokenizer, save_model
from models.tiny import train_tokenizer
from perennial import demo_data


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(demo_data.general_corpus(200, 0), vocab_size=300)


def small_model(vocab, seed=0):
    torch.manual_seed(seed)
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


REPO_ID = "perennial-tests/tiny-llama"
MAIN_COMMIT = "1" * 40
V2_COMMIT = "2" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into its
    constants at import, so those are set too (the environment variables for anything read later)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named like the repo id can shadow it
    return cache


def add_snapshot(cache, repo_id, commit, model, tokenizer, refs=()):
    """What a download leaves in the cache: content-addressed blobs, a snapshot folder of relative
    symlinks to them per commit, and refs/<branch or tag> files holding a commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    staged = save_model(model, tokenizer, cache.parent / f"staged-{commit[:8]}")
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in staged.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    shutil.rmtree(staged)


def assert_same_weights(loaded, expected):
    expected_state = expected.state_dict()
    assert loaded.state_dict().keys() == expected_state.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), name


def test_hub_id_loads_from_the_cache_offline_by_branch_tag_and_commit(hub_cache, tokenizer):
    main, v2 = small_model(len(tokenizer), seed=0), small_model(len(tokenizer), seed=1)
    add_snapshot(hub_cache, REPO_ID, MAIN_COMMIT, main, tokenizer, refs=["main"])
    add_snapshot(hub_cache, REPO_ID, V2_COMMIT, v2, tokenizer, refs=["v2"])

    loaded, loaded_tokenizer = load_model_and_tokenizer(REPO_ID)  # no revision: refs/main
    assert_same_weights(loaded, main)
    assert loaded_tokenizer.encode("the farmer walked") == tokenizer.encode("the farmer walked")
    assert loaded_tokenizer.pad_token == "<pad>"
    for revision in ("v2", V2_COMMIT):  # a tag through refs/, a commit straight to its snapshot
        loaded, _ = load_model_and_tokenizer(REPO_ID, revision=revision)
        assert_same_weights(loaded, v2)


def test_missing_hub_model_offline_says_how_to_fix_it(hub_cache, tokenizer):
    with pytest.raises(ModelLoadError) as missing:
        load_model_and_tokenizer("perennial-tests/no-such-model")
    message = str(missing.value)
    assert "not in the Hugging Face cache" in message and str(hub_cache) in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "`HF_HUB_OFFLINE=0 hf download perennial-tests/no-such-model`" in message
    assert "HF_HUB_CACHE" in message and "model.source=local" in message
    assert "couldn't connect" not in message  # transformers' advice to check the internet connection is wrong here

    add_snapshot(hub_cache, REPO_ID, MAIN_COMMIT, small_model(len(tokenizer)), tokenizer, refs=["main"])
    with pytest.raises(ModelLoadError, match=r"revision 'v9'.*hf download perennial-tests/tiny-llama --revision v9"):
        load_model_and_tokenizer(REPO_ID, revision="v9")  # the repo is cached, this revision is not


def test_chat_template_used_when_present_else_default(tokenizer):
    assert render_prompt(tokenizer, "hi") == DEFAULT_PROMPT_TEMPLATE.format(prompt="hi")
    templated = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    templated.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    assert render_prompt(templated, "hi") == "<|user|>hi<|assistant|>"
