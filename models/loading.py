"""Loading and saving causal LMs: local directories, hub ids, the project's own checkpoints.

A hub id (``org/name``, optionally a ``revision``: branch, tag or commit) goes through
transformers' own hub resolution: with HF_HUB_OFFLINE=1 (Perennial's default, perennial/env.py)
it is read from the Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) only.
Only safetensors weights are accepted: a directory holding only pickle weights (``*.bin``,
``*.pt``) is refused rather than unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from models.atomic import atomic_dir


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


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except ValueError:  # not even a valid repo id
        return False


def _load_error(what: str, name_or_path: str | Path, revision: str | None, error: Exception) -> ModelLoadError:
    """transformers' offline message ("couldn't connect ... check your internet connection") does
    not say that the hub is off on purpose, nor how to get the model; this one does."""
    if Path(name_or_path).exists():
        return ModelLoadError(f"cannot load the {what} in {name_or_path}: {error}")
    at = f" at revision {revision!r}" if revision else ""
    if hub_constants.is_offline_mode() and not _in_hub_cache(str(name_or_path), revision):
        download = f"HF_HUB_OFFLINE=0 hf download {name_or_path}" + (f" --revision {revision}" if revision else "")
        return ModelLoadError(
            f"{str(name_or_path)!r} is not a local directory, and as a hub model id{at} it is not in the Hugging Face "
            f"cache {hub_constants.HF_HUB_CACHE}; hub downloads are off (HF_HUB_OFFLINE=1, Perennial's default). "
            f"To fix: download it once on a machine with network access (`{download}`), point HF_HUB_CACHE (or "
            "HF_HOME) at a cache that holds it, or give the path of a saved model directory (model.source=local)."
        )
    return ModelLoadError(f"cannot load the {what} of hub model {str(name_or_path)!r}{at}: {error}")


def load_tokenizer(name_or_path: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder or hub id, with a pad token (EOS when it has none).

    Raises ModelLoadError when it cannot be loaded, or when it has no EOS token: every training
    answer and packed document ends with EOS, and generation stops on it, so without one the
    first encoded example would fail far from the cause (a TypeError on a None id).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
    except OSError as error:
        raise _load_error("tokenizer", name_or_path, revision, error) from None
    if tokenizer.eos_token_id is None:
        specials = ", ".join(repr(token) for token in tokenizer.all_special_tokens) or "none"
        raise ModelLoadError(
            f"tokenizer in {name_or_path} has no eos_token; Perennial ends every answer and document with it. "
            'Set eos_token in its tokenizer_config.json to the token that ends a text for this model, e.g. "eos_token": "</s>" '
            f"(its special tokens: {specials})"
        )
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
    """A local directory or a hub id (from the cache when offline); the same transformers loading path either way."""
    path = Path(name_or_path)
    if path.exists():
        _check_local_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), revision=revision, attn_implementation=attn_implementation, use_safetensors=True
        )
    except OSError as error:
        raise _load_error("model", name_or_path, revision, error) from None
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
    """Weights as safetensors plus config and tokenizer: loadable by plain AutoModelForCausalLM.

    Written all or nothing (models/atomic.py): a full disk raises DiskFullError naming the folder.
    """
    directory = Path(directory)
    with atomic_dir(directory) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
    return directory
