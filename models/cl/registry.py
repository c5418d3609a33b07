"""From the configured CIT methods (cit.methods) to plugin instances.

    plugins = build_plugins(cfg.cit.methods, seed=cfg.seed)
    check_requirements(cfg.cit.methods, cfg.cit.tuning.method, cfg.model.attn_implementation)

Each config's fields (less `name`) are the plugin's constructor arguments; see docs/methods.md.
"""

from __future__ import annotations

from typing import Any, Iterable

from pydantic import TypeAdapter

from models.cl.averaging import AveragingPlugin
from models.cl.base import CLPlugin
from models.cl.ewc import EWCPlugin
from models.cl.lwf import LwFPlugin
from models.cl.merge import MergePlugin
from models.cl.olora import OLoRAPlugin
from models.cl.seekr import SEEKRPlugin
from perennial.config import CLMethodConfig

PLUGINS: dict[str, type[CLPlugin]] = {
    "ewc": EWCPlugin,
    "lwf": LwFPlugin,
    "averaging": AveragingPlugin,
    "seekr": SEEKRPlugin,
    "olora": OLoRAPlugin,
    "merge": MergePlugin,
}

_validate = TypeAdapter(CLMethodConfig).validate_python


def _as_config(config: Any):
    # Plain dicts (e.g. from a test or a notebook) get the same validation as the YAML config.
    return _validate(config) if isinstance(config, dict) else config


def build_plugins(configs: Iterable[Any], seed: int = 0) -> list[CLPlugin]:
    """One plugin per method config, in order (the engine adds their losses in this order)."""
    plugins = []
    for config in map(_as_config, configs):
        if config.name not in PLUGINS:
            raise ValueError(f"unknown CIT method {config.name!r}; known: {sorted(PLUGINS)}")
        plugins.append(PLUGINS[config.name](**config.model_dump(exclude={"name"}), seed=seed))
    return plugins


def check_requirements(configs: Iterable[Any], tuning_method: str, attn_implementation: str) -> None:
    """Refuse method / model combinations that cannot work, before any training starts."""
    for config in map(_as_config, configs):
        if config.name == "seekr" and attn_implementation != "eager":
            raise ValueError(
                f"CIT method 'seekr' distils attention weights, which only attn_implementation='eager' returns "
                f"(got {attn_implementation!r}); set model.attn_implementation: eager"
            )
        if config.name == "olora" and tuning_method != "lora":
            raise ValueError(f"CIT method 'olora' learns per-task LoRA subspaces; set cit.tuning.method: lora (got {tuning_method!r})")
