"""Loading and saving causal LMs: local directories, hub ids (when online), the project's own checkpoints.

Only safetensors weights are accepted: a directory holding only pickle weights (``*.bin``,
``*.pt``) is refused rather than unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


class ModelLoadError(ValueError):
    pass


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_local_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a saved Hugging Face model directory")
    files = [p.name for p in path.iterdir() if p.is_file()]
    if not any(name.endswith(".safetensors") for name in files):
        pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelLoadError(
                f"{path} holds only pickle weights ({', '.join(sorted(pickles))}); Perennial loads safetensors only. "
                "Convert with `model.save_pretrained(dir, safe_serialization=True)` in a trusted environment."
            )
        raise ModelLoadError(f"{path} has no weights (*.safetensors); was the save interrupted?")


def load_tokenizer(name_or_path: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
    if tokenizer.pad_token_id is None:
        # Causal LMs often ship without a pad token; EOS is the conventional stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str | Path,
    revision: str | None = None,
    attn_implementation: str = "eager",
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """A local directory or, with a network, a hub id; the same transformers loading path either way."""
    path = Path(name_or_path)
    if path.exists():
        _check_local_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), revision=revision, attn_implementation=attn_implementation, use_safetensors=True
        )
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: hub ids load only from the local cache)" if offline and not path.exists() else ""
        raise ModelLoadError(f"cannot load model {name_or_path!r}{hint}: {error}") from None
    return model.to(device)


def load_model_and_tokenizer(name_or_path: str | Path, revision: str | None = None, attn_implementation: str = "eager", device="cpu"):
    tokenizer = load_tokenizer(name_or_path, revision)
    model = load_causal_lm(name_or_path, revision, attn_implementation, device)
    check_compatible(model, tokenizer, name_or_path)
    return model, tokenizer


def check_compatible(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, where: str | Path = "model") -> None:
    """A tokenizer whose ids run past the embedding table would fail mid-training; catch it up front."""
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ModelLoadError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding table has {vocab}; "
            "they do not belong together"
        )


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Weights as safetensors plus config and tokenizer: loadable by plain AutoModelForCausalLM."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
