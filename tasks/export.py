"""Export a committed checkpoint as a plain Hugging Face folder (what `lm_eval --model hf` reads)."""

from __future__ import annotations

import shutil
from pathlib import Path

from perennial.config import Config
from tasks.runtime import fetch_dir, open_store

PERENNIAL_ONLY = ("perennial_plugins", "training.json", ".complete")


def export_model(config: Config, model_uri: str, out_dir: str | Path) -> Path:
    """Copy the verified checkpoint (merged weights, config, tokenizer) without Perennial's own state."""
    local = fetch_dir(open_store(config), model_uri, Path(config.work_dir) / "cache")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new folder for the export")
    shutil.copytree(local, out_dir, ignore=shutil.ignore_patterns(*PERENNIAL_ONLY), dirs_exist_ok=True)
    return out_dir
