"""Deciding what is trained: full fine-tuning, peft adapters (LoRA, MoRA, OSF) or a selective subset.

The selective presets freeze everything but a named group of weight matrices (see TuningConfig),
to limit which parts of the network a new task can move: attn-proj trains only the self-attention
projections, mlp-gate-up only the MLP's gate and up projections (down_proj stays fixed).

Tied word embeddings (``tie_word_embeddings``: the input embeddings and lm_head are one tensor):
full and regex train that one tensor, so a pattern naming either module trains both and the saved
model stays tied. A peft adapter on either module changes only that module's output, so that
module gets its own copy of the matrix first (`_untie_targeted_embeddings`) and the merged model
is exactly the trained one. Only a module the tuner actually wraps is untied: when it skips or
refuses the tied modules, the tie is restored (`_retie`).
"""

from __future__ import annotations

import re

import peft
import torch
from peft import LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

from models.mora import MoraConfig, choose_mora_type
from perennial.config import TuningConfig

# Matched with re.search against full parameter names such as "model.layers.0.self_attn.q_proj.weight".
SELECTIVE_PATTERNS: dict[str, tuple[str, ...]] = {
    "attn-proj": (r"(^|\.)(q_proj|k_proj|v_proj|o_proj)\.",),
    "mlp-gate-up": (r"(^|\.)(gate_proj|up_proj)\.",),
}


def apply_tuning(model: torch.nn.Module, tuning: TuningConfig) -> torch.nn.Module:
    """Make exactly the parameters `tuning` asks for trainable; peft methods return a wrapped PeftModel."""
    method = tuning.method
    if method == "full":
        model.requires_grad_(True)
        return model
    if method in SELECTIVE_PATTERNS:
        return _train_only_matching(model, method, SELECTIVE_PATTERNS[method])
    if method == "regex":
        return _train_only_matching(model, method, tuple(tuning.trainable_regex))
    if method == "lora":
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=tuning.r, lora_alpha=tuning.alpha,
            lora_dropout=tuning.dropout, target_modules=list(tuning.target_modules),
        )
        return _wrap(model, config)
    if method == "mora":
        # MoRA has no alpha: its update is not rescaled (as in the paper's reference code).
        config = MoraConfig(
            task_type=TaskType.CAUSAL_LM, r=tuning.r, mora_type=choose_mora_type(tuning.r, tuning.mora_type),
            mora_dropout=tuning.dropout, target_modules=list(tuning.target_modules),
        )
        return _wrap(model, config)
    if method == "osf":
        return _wrap(model, _osf_config(tuning))
    raise ValueError(f"unknown tuning.method {method!r}")


def _wrap(model: torch.nn.Module, config: PeftConfig) -> PeftModel:
    untied = _untie_targeted_embeddings(model, config)
    try:
        wrapped = get_peft_model(model, config)
    except Exception:
        _retie(model, untied)  # a tuner that refuses a target (MoRA: an embedding) leaves the model as it was
        raise
    if untied is not None and not any(isinstance(model.get_submodule(name), BaseTunerLayer) for name in untied[1]):
        # The tuner skipped every tied module it was pointed at (OSF passes over an nn.Embedding without
        # a word): nothing trains them apart, so they stay one matrix and the export stays tied.
        _retie(model, untied)
    return wrapped


_Untied = tuple[torch.nn.Parameter, list[str], list[torch.nn.Module]]  # shared matrix, tied module names, modules given a copy


def _untie_targeted_embeddings(model: torch.nn.Module, config: PeftConfig) -> _Untied | None:
    """Give each module that shares the input embedding matrix its own copy, if `config` adapts any of them.

    Why: an adapter on lm_head (or on the input embeddings) changes only that module's output, so the
    model being trained already behaves untied; merging would fold the update into the shared tensor
    and so move the other module as well (exported logits off by whole units). Untied, the merge is
    exact, and `tie_word_embeddings=False` makes the saved model load untied too: it holds one more
    vocab x hidden matrix. A model whose config does not tie its embeddings is left alone.
    Returns what `_retie` needs to undo it, or None when nothing was untied.
    """
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    embeddings = model.get_input_embeddings()
    shared = embeddings.weight
    tied = {name: module for name, module in model.named_modules() if getattr(module, "weight", None) is shared}
    if len(tied) < 2 or not any(check_target_module_exists(config, name) for name in tied):
        return None
    copied = []
    for module in tied.values():
        if module is not embeddings:
            module.weight = torch.nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            copied.append(module)
    model.config.tie_word_embeddings = False
    return shared, list(tied), copied


def _retie(model: torch.nn.Module, untied: _Untied | None) -> None:
    """Undo `_untie_targeted_embeddings`: the modules share the original matrix again, and the config says so."""
    if untied is None:
        return
    shared, _, copied = untied
    for module in copied:
        module.weight = shared
    model.config.tie_word_embeddings = True


def _osf_config(tuning: TuningConfig):
    osf_config_cls = getattr(peft, "OSFConfig", None)
    if osf_config_cls is None:
        raise ValueError(
            f"tuning.method='osf' needs peft's OSF tuner (peft.OSFConfig), which the installed peft "
            f"{peft.__version__} does not provide; upgrade peft or choose another tuning.method"
        )
    # OSF's rank means the preserved (frozen) SVD rank, not a trainable rank like LoRA's r, so r is not
    # passed on: OSF's default keeps the top half of each matrix's singular directions frozen.
    return osf_config_cls(task_type=TaskType.CAUSAL_LM, target_modules=list(tuning.target_modules))


def _train_only_matching(model: torch.nn.Module, method: str, patterns: tuple[str, ...]) -> torch.nn.Module:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"tuning.method={method!r}: invalid regex {pattern!r}: {error}") from error
    # Every name a parameter is reachable by: a tied embedding matrix is both "model.embed_tokens.weight"
    # and "lm_head.weight", and named_parameters() lists only the first, so a pattern for the head would
    # silently match nothing.
    names: dict[torch.nn.Parameter, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(parameter, []).append(name)
    matched = 0
    for parameter, aliases in names.items():
        trainable = any(regex.search(name) for regex in compiled for name in aliases)
        parameter.requires_grad_(trainable)
        matched += trainable
    if not matched:
        raise ValueError(
            f"tuning.method={method!r} matched no parameters of {type(model).__name__} "
            f"(patterns: {list(patterns)}); its parameter names look like "
            f"{[name for name, _ in model.named_parameters()][:5]}"
        )
    return model


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts; tied weights are counted once."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def merge_for_export(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model to save or serve: adapters folded into the base weights, anything else unchanged."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
