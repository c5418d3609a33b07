"""The real loading path (AutoModel/AutoTokenizer) on local model directories and on a Hugging Face
hub cache the tests create (hub ids resolved offline, as Perennial runs by default)."""

import hashlib
import os
import shutil

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from models.data import encode_instruction, encode_prompt
from models.loading import ModelLoadError, load_model_and_tokenizer, load_tokenizer, save_model
from models.tiny import train_tokenizer
from perennial import demo_data
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(demo_data.general_corpus(200, 0), vocab_size=300)


def small_model(vocab, seed=0):
    return tiny_model("llama", vocab_size=vocab, seed=seed, attn_implementation=None, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)


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


DEFAULT_PROMPT = "### Instruction:\n{prompt}\n### Response:\n"  # what models.data.DEFAULT_CHAT_TEMPLATE renders for one turn


def test_chat_template_used_when_present_else_default(tokenizer):
    assert tokenizer.decode(encode_prompt(tokenizer, "hi")) == "<s>" + DEFAULT_PROMPT.format(prompt="hi")
    templated = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    templated.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    assert templated.decode(encode_prompt(templated, "hi")) == "<|user|>hi<|assistant|>"


# --------------------------------------------------------------------------- prompt special tokens (issue #17)

LLAMA_STYLE_TEMPLATE = (  # emits BOS itself, as Llama-2/3 templates do
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's ChatML template, verbatim
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_reference(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=False)


@pytest.fixture(scope="module")
def llama_style(tokenizer):
    templated = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    templated.chat_template = LLAMA_STYLE_TEMPLATE
    return templated


@pytest.fixture(scope="module")
def smollm2_style():
    """A ChatML tokenizer whose bos_token is the template's own start token, as SmolLM2's is."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(demo_data.general_corpus(200, 0), trainer=trainer)
    chatml = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    chatml.chat_template = SMOLLM2_TEMPLATE
    return chatml


def test_template_that_emits_bos_gets_it_once(llama_style):
    prompt = "the farmer walked"
    ids = encode_prompt(llama_style, prompt)
    assert ids == chat_reference(llama_style, prompt)
    assert ids[0] == llama_style.bos_token_id and ids.count(llama_style.bos_token_id) == 1
    example = encode_instruction(llama_style, prompt, "to the river", 64)
    assert example["input_ids"][: len(ids)] == ids and example["labels"][: len(ids)] == [-100] * len(ids)


def test_chatml_bos_that_is_the_template_start_token_is_not_doubled(smollm2_style):
    prompt = "the farmer walked"
    ids = encode_prompt(smollm2_style, prompt)
    assert ids == chat_reference(smollm2_style, prompt)
    start = smollm2_style.convert_tokens_to_ids("<|im_start|>")
    assert smollm2_style.bos_token_id == start
    assert ids[0] == start and ids[1] != start
    assert ids.count(start) == 3  # system, user, assistant turns: one each
    assert encode_instruction(smollm2_style, prompt, "to the river", 256)["input_ids"][: len(ids)] == ids


def test_no_template_gets_bos_once_then_the_default_template(tokenizer):
    prompt = "the farmer walked"
    expected = [tokenizer.bos_token_id] + tokenizer.encode(DEFAULT_PROMPT.format(prompt=prompt), add_special_tokens=False)
    assert encode_prompt(tokenizer, prompt) == expected
    assert expected.count(tokenizer.bos_token_id) == 1


def test_saved_and_exported_tokenizer_encodes_prompts_identically(tmp_path, monkeypatch, llama_style, smollm2_style):
    import tasks.export
    from perennial.config import Config

    for name, templated in (("llama", llama_style), ("chatml", smollm2_style)):
        saved = save_model(small_model(len(templated)), templated, tmp_path / name)
        _, reloaded = load_model_and_tokenizer(saved)
        # export_model copies the fetched checkpoint minus Perennial's own files; serve it the saved folder.
        monkeypatch.setattr(tasks.export, "ObjectStore", lambda storage: None)
        monkeypatch.setattr(tasks.export, "fetch_dir", lambda store, uri, cache, saved=saved: saved)
        exported = tasks.export.export_model(Config(work_dir=tmp_path / "work"), "s3://unused/ckpt", tmp_path / f"{name}-export")
        _, from_export = load_model_and_tokenizer(exported)
        for loaded in (reloaded, from_export):
            assert loaded.chat_template == templated.chat_template
            for prompt in ("the farmer walked", "a child found the market"):
                assert encode_prompt(loaded, prompt) == encode_prompt(templated, prompt) == chat_reference(templated, prompt)
                assert encode_instruction(loaded, prompt, "yes", 64) == encode_instruction(templated, prompt, "yes", 64)


# --------------------------------------------------------------------------- tokenizer without EOS (issue #17)


def test_tokenizer_without_eos_is_refused_at_load_saying_what_to_set(tmp_path, tokenizer):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    assert no_eos.eos_token_id is None
    save_model(small_model(len(no_eos)), no_eos, tmp_path)
    with pytest.raises(ModelLoadError) as refused:
        load_model_and_tokenizer(tmp_path)
    message = str(refused.value)
    assert f"tokenizer in {tmp_path} has no eos_token" in message
    assert 'set eos_token in its tokenizer_config.json' in message.lower() and '"eos_token": "</s>"' in message
    with pytest.raises(ModelLoadError, match="no eos_token"):
        load_tokenizer(tmp_path)  # the tokenizer-only path (tasks/launch.py) refuses it too
