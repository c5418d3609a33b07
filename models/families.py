"""What each decoder family calls its projections, and how many positions it has.

Perennial names the seven projections of a decoder block by their Llama names, which double as
*roles*: ``q_proj``, ``k_proj``, ``v_proj`` (queries, keys, values), ``o_proj`` (attention output),
``gate_proj``, ``up_proj`` (the MLP's input side) and ``down_proj`` (its output side). Other
families name them otherwise, and some compute several roles in one fused layer: Phi-3's
``qkv_proj`` is q, k and v; GPT-NeoX, Falcon and Bloom's ``query_key_value`` and GPT-2's ``c_attn``
too; Phi-3's ``gate_up_proj`` is gate and up. A family whose MLP has no gate (GPT-NeoX, GPT-2,
Falcon, ...) simply has no ``gate_proj`` role.

`LAYOUTS` maps a transformers ``model_type`` to its layout: module name (the last one or two
components of the module's path, matched on whole components) -> the roles that module computes.
A model_type not listed is assumed to use the Llama names (llama, mistral, qwen2, qwen3, gemma,
gemma2, olmo2 and most recent decoders do); `models.tuning` then checks that every role is really
there and refuses the method otherwise, so an unknown layout is never trained half-way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")
ROLES = ATTENTION_ROLES + MLP_ROLES

_QKV = ("q_proj", "k_proj", "v_proj")
LLAMA_LAYOUT: dict[str, tuple[str, ...]] = {role: (role,) for role in ROLES}
_FUSED_QKV_DENSE = {  # GPT-NeoX, Falcon, Bloom: fused query_key_value, non-gated MLP
    "query_key_value": _QKV, "dense": ("o_proj",), "dense_h_to_4h": ("up_proj",), "dense_4h_to_h": ("down_proj",),
}
_GPT2 = {"c_attn": _QKV, "attn.c_proj": ("o_proj",), "c_fc": ("up_proj",), "mlp.c_proj": ("down_proj",)}

LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "phi3": {"qkv_proj": _QKV, "o_proj": ("o_proj",), "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
    "gpt_neox": _FUSED_QKV_DENSE,
    "falcon": _FUSED_QKV_DENSE,
    "bloom": _FUSED_QKV_DENSE,
    "gpt2": _GPT2,  # transformers Conv1D layers (weight stored d_in x d_out)
    "gpt_bigcode": _GPT2,  # same names, nn.Linear layers
    "phi": {**{role: (role,) for role in _QKV}, "dense": ("o_proj",), "fc1": ("up_proj",), "fc2": ("down_proj",)},
    "starcoder2": {**{role: (role,) for role in ATTENTION_ROLES}, "c_fc": ("up_proj",), "c_proj": ("down_proj",)},
    "gptj": {**{role: (role,) for role in _QKV}, "out_proj": ("o_proj",), "fc_in": ("up_proj",), "fc_out": ("down_proj",)},
    "opt": {**{role: (role,) for role in _QKV}, "out_proj": ("o_proj",), "fc1": ("up_proj",), "fc2": ("down_proj",)},
}


def model_type(model: torch.nn.Module) -> str | None:
    """The transformers ``model_type`` of a model (through peft wrappers too); None for a plain torch module."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if config is not None else None


def layout(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Module name -> roles for the model's family (`LAYOUTS`), the Llama names when it is not listed."""
    return LAYOUTS.get(model_type(model), LLAMA_LAYOUT)


def matches(module_path: str, name: str) -> bool:
    """Whether ``name`` ("q_proj", "attn.c_proj") is the end of ``module_path`` on whole components.

    The same rule as a peft ``target_modules`` list entry, so a name resolved here adapts exactly
    the modules it found when handed to peft.
    """
    return module_path == name or module_path.endswith("." + name)


@dataclass(frozen=True)
class Projection:
    name: str  # the layout's name for it, e.g. "qkv_proj"
    roles: tuple[str, ...]  # the roles it computes, e.g. ("q_proj", "k_proj", "v_proj")
    paths: tuple[str, ...]  # every module of the model with that name, e.g. "model.layers.0.self_attn.qkv_proj"


def projections(model: torch.nn.Module) -> list[Projection]:
    """The model's projections per its family's layout, in layout order; a name found nowhere has no paths."""
    paths = [path for path, _ in model.named_modules()]
    return [Projection(name, roles, tuple(p for p in paths if matches(p, name))) for name, roles in layout(model).items()]


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``, GPT-2's ``n_positions``);
    None when its config names none (e.g. Bloom's ALiBi)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
