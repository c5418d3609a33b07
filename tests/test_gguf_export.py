"""`perennial export --format gguf`: one GGUF file that transformers' GGUF loader (the path that loads the
packaged default) and, where installed, llama.cpp read back as the exported model.

Tolerances, on logits of order 1 (tiny) and 40 (SmolLM2):
- transformers' loader, against the exported model with its weights rounded to the file's dtype: 1e-5
  absolute (tiny): the file holds exactly those weights; what is left is float32 arithmetic.
- the same against the float32 model: 1e-5 for f32, 2e-3 for f16, 1e-2 for bf16 (tiny), from the rounding itself.
- llama.cpp against the rounded model: 2e-3 (tiny): llama.cpp keeps its KV cache in f16.
Greedy answers must be equal token for token.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.cli import main
from models.data import DEFAULT_CHAT_TEMPLATE, encode_prompt
from models.evaluation import generate
from models.gguf import GGUFError, write_gguf
from models.loading import load_model_and_tokenizer, save_model
from tests.tiny_models import tiny

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TO_F32 = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2}
CONVERSATION = [{"role": "system", "content": "Answer in French. Be brief."}, {"role": "user", "content": "What is 12 + 30?"}]


def _load_gguf(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _rounded(checkpoint: Path, dtype: str):
    """The exported model with its weights rounded to ``dtype`` (norms stay float32, as in the file), computing in float32."""
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 1:
                parameter.copy_(parameter.to(DTYPES[dtype]).float())
    return model, tokenizer


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("family,dtype,chat_template", [
    ("llama", "f32", "chatml"), ("llama", "f16", "chatml"), ("llama", "bf16", "chatml"),  # rotary q/k permutation, GQA 4/2
    ("qwen2", "f32", None),  # q/k/v biases, tied embeddings, no chat template
])
def test_the_gguf_loads_back_through_transformers_as_the_exported_model(family, dtype, chat_template, tmp_path):
    model, tokenizer = tiny(family) if chat_template else tiny(family, chat_template=None)
    checkpoint = save_model(model, tokenizer, tmp_path / "checkpoint")
    out = write_gguf(checkpoint, tmp_path / "gguf" / "model.gguf", dtype)
    assert out.is_file() and [path.name for path in out.parent.iterdir()] == ["model.gguf"]  # nothing partial left

    loaded, loaded_tokenizer = _load_gguf(out)
    exported, exported_tokenizer = load_model_and_tokenizer(checkpoint)
    # The tokenizer and the template the model was trained with travel in the metadata (the default
    # template for a tokenizer without one), so the same conversation becomes the same ids.
    assert loaded_tokenizer.chat_template == (exported_tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
    ids = encode_prompt(exported_tokenizer, CONVERSATION if chat_template else "What is 12 + 30?")
    assert encode_prompt(loaded_tokenizer, CONVERSATION if chat_template else "What is 12 + 30?") == ids
    assert loaded.config.tie_word_embeddings == exported.config.tie_word_embeddings

    rounded, _ = _rounded(checkpoint, dtype)
    logits = _logits(loaded, ids)
    assert torch.allclose(logits, _logits(rounded, ids), rtol=0, atol=1e-5)
    assert torch.allclose(logits, _logits(exported, ids), rtol=0, atol=TO_F32[dtype])
    prompt = CONVERSATION if chat_template else "What is 12 + 30?"
    assert generate(loaded, loaded_tokenizer, [prompt], max_new_tokens=12) == generate(rounded, exported_tokenizer, [prompt], max_new_tokens=12)


def test_an_architecture_dtype_or_tokenizer_it_cannot_write_is_refused_naming_what_it_can(tmp_path):
    model, tokenizer = tiny("gpt2")
    checkpoint = save_model(model, tokenizer, tmp_path / "gpt2")
    with pytest.raises(GGUFError, match=r"writes the architectures llama \(e\.g\. SmolLM2.*qwen2 .*this model is 'gpt2'"):
        write_gguf(checkpoint, tmp_path / "out.gguf")
    model, tokenizer = tiny("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    checkpoint = save_model(model, tokenizer, tmp_path / "scaled")
    with pytest.raises(GGUFError, match="rope scaling 'linear'.*convert_hf_to_gguf"):
        write_gguf(checkpoint, tmp_path / "out.gguf")
    with pytest.raises(GGUFError, match="writes the dtypes f32, f16, bf16; got 'q4_0'"):
        write_gguf(checkpoint, tmp_path / "out.gguf", "q4_0")
    (tmp_path / "taken.gguf").write_text("mine")
    with pytest.raises(FileExistsError, match="taken.gguf exists; choose a new file name"):
        write_gguf(checkpoint, tmp_path / "taken.gguf")
    assert not (tmp_path / "out.gguf").exists() and (tmp_path / "taken.gguf").read_text() == "mine"


@pytest.fixture
def registered_tiny(services, store, tmp_path):
    """A tiny llama committed to S3 as a stage commits one and registered as v1 with alias champion."""
    model, tokenizer = tiny("llama")
    folder = save_model(model, tokenizer, tmp_path / "checkpoint")
    store.upload_dir(folder, "runs/r1/stages/cit-01/model")
    uri = store.uri("runs/r1/stages/cit-01/model")
    client = MlflowClient(services.mlflow_uri)
    name = f"gguf-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, uri, tags={"checkpoint_uri": uri})
    client.set_registered_model_alias(name, "champion", version.version)
    return name, folder


@pytest.mark.integration
def test_perennial_export_format_gguf_writes_the_champion_as_one_file(registered_tiny, tmp_path, monkeypatch, capsys):
    name, checkpoint = registered_tiny
    monkeypatch.chdir(tmp_path)
    assert main(["export", f"models:/{name}@champion", "champion.gguf", "--format", "gguf", "--dtype", "bf16"]) == 0, capsys.readouterr().err
    assert "exported to champion.gguf (GGUF, bf16)" in capsys.readouterr().out
    from gguf import GGUFReader

    assert GGUFReader(tmp_path / "champion.gguf").fields["general.name"].contents() == f"{name}-champion"
    loaded, _ = _load_gguf(tmp_path / "champion.gguf")
    rounded, tokenizer = _rounded(checkpoint, "bf16")
    ids = encode_prompt(tokenizer, CONVERSATION)
    assert torch.allclose(_logits(loaded, ids), _logits(rounded, ids), rtol=0, atol=1e-5)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["champion.gguf", "checkpoint"]  # the download is gone

    # mistakes are refused before any download, saying what to do
    assert main(["export", f"models:/{name}@champion", "champion.gguf", "--format", "gguf"]) == 1
    assert "champion.gguf exists; choose a new file name" in capsys.readouterr().err
    assert main(["export", f"models:/{name}@champion", "other.gguf"]) == 1
    assert "other.gguf names a GGUF file; add --format gguf" in capsys.readouterr().err
    assert main(["export", f"models:/{name}@champion", "folder", "--dtype", "f16"]) == 1
    assert "--dtype applies to --format gguf" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_survives_the_round_trip_through_gguf(smollm2_dir, tmp_path):
    """The real default model (49,152-token BPE with its merges, GQA 9/3 heads, tied embeddings, ChatML) in f16."""
    out = write_gguf(smollm2_dir, tmp_path / "smollm2.gguf", "f16")
    assert 2.6e8 < out.stat().st_size < 2.8e8  # 134.5M weights in 2 bytes, the embedding written once
    loaded, loaded_tokenizer = _load_gguf(out)
    rounded, tokenizer = _rounded(smollm2_dir, "f16")
    ids = encode_prompt(tokenizer, "What is the capital of France?")
    assert encode_prompt(loaded_tokenizer, "What is the capital of France?") == ids
    assert torch.allclose(_logits(loaded, ids), _logits(rounded, ids), rtol=0, atol=1e-3)  # logits up to ~40
    assert generate(loaded, loaded_tokenizer, ["What is the capital of France?"], max_new_tokens=10) == ["The capital of France is Paris."]


LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed: it is an sdist that compiles llama.cpp "
                    "(about 15 min on 2 cores), so it is no dependency of the project. To run this check: "
                    "pip install llama-cpp-python==0.3.36")
@pytest.mark.parametrize("family,dtype", [("llama", "f32"), ("llama", "f16"), ("qwen2", "bf16")])
def test_llama_cpp_reads_the_gguf_and_answers_as_perennial(family, dtype, tmp_path):
    """Opt-in: llama.cpp's own tokenizer, chat template and kernels on the written file."""
    import numpy as np
    from llama_cpp import Llama

    model, tokenizer = tiny(family)
    checkpoint = save_model(model, tokenizer, tmp_path / "checkpoint")
    out = write_gguf(checkpoint, tmp_path / "model.gguf", dtype)
    rounded, tokenizer = _rounded(checkpoint, dtype)
    ids = encode_prompt(tokenizer, CONVERSATION)
    llm = Llama(model_path=str(out), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    assert np.allclose(np.array(llm.scores[: len(ids)]), _logits(rounded, ids).numpy(), rtol=0, atol=2e-3)
    llm.reset()
    greedy = []
    for token in llm.generate(ids, top_k=1, temp=0.0):
        if token == tokenizer.eos_token_id or len(greedy) == 12:
            break
        greedy.append(token)
    assert tokenizer.decode(greedy, skip_special_tokens=True) == generate(rounded, tokenizer, [CONVERSATION], max_new_tokens=12)[0]
    # llama.cpp's chat path renders the template in the file (as Ollama and LM Studio do), then answers the same
    chat = llm.create_chat_completion(messages=CONVERSATION, max_tokens=12, temperature=0.0, top_k=1)
    assert chat["usage"]["prompt_tokens"] == len(ids) and chat["usage"]["completion_tokens"] == len(greedy)
