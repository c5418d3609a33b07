"""Deciding what is trained: full fine-tuning, peft adapters (LoRA, MoRA, OSF) or a selective subset.

The selective presets freeze everything but a named group of projections (see TuningConfig), to
limit which parts of the network a new task can move: attn-proj trains only the self-attention
projections, mlp-gate-up only the MLP's gate and up projections (down_proj stays fixed).

Targets are resolved per architecture (`plan_tuning`, with `models.families`): the presets and the
Llama names in ``tuning.target_modules`` (q_proj ... down_proj) are *roles*, found under each
family's own names, fused layers included (Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's
query_key_value, GPT-2's c_attn). A fused layer that computes a role the method was not asked
for (an adapter on q_proj and v_proj, which Phi-3 computes together with k_proj) is adapted whole,
since peft adapters wrap whole modules; the plan says so in its notes, which are logged and
recorded with the run. A method that cannot apply is refused before training, naming what it
looked for and what to set; so is a partial match (some roles found, others of the same request not).

Tied word embeddings (``tie_word_embeddings``: the input embeddings and lm_head are one tensor):
full and regex train that one tensor, so a pattern naming either module trains both and the saved
model stays tied. A peft adapter on either module changes only that module's output, so that
module gets its own copy of the matrix first (`_untie_targeted_embeddings`) and the merged model
is exactly the trained one. `plan_tuning` refuses a tuner on a module it cannot wrap (MoRA and OSF
on an embedding), and a tuner that raises all the same gets the tie restored (`_retie`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import peft
import torch
from peft import LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from models.families import ATTENTION_ROLES, ROLES, Projection, matches, model_type, projections
from models.mora import MoraConfig, choose_mora_type
from perennial.config import TuningConfig

log = logging.getLogger(__name__)

# The roles each selective preset trains (every parameter of the modules computing them, biases included).
PRESET_ROLES: dict[str, tuple[str, ...]] = {
    "attn-proj": ATTENTION_ROLES,
    "mlp-gate-up": ("gate_proj", "up_proj"),
}
# Tuners that wrap nn.Linear layers only (MoRA's layer, peft's OSF dispatch); LoRA also wraps
# embeddings and transformers' Conv1D.
LINEAR_ONLY = {"mora": "MoRA", "osf": "OSF"}


@dataclass(frozen=True)
class TuningPlan:
    """What `apply_tuning` will train on one model, resolved before anything is changed.

    targets: the module names (as in a peft ``target_modules`` list) adapted or, for the presets,
    trained; empty for full and regex, which name parameters themselves. notes: every way the
    plan differs from the literal request (a fused layer adapted whole, a role the family lacks).
    """

    method: str
    model_type: str | None
    targets: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def params(self) -> dict[str, str]:
        """The plan as run parameters (MLflow), so a run records what it really trained."""
        return {
            "tuning.model_type": self.model_type or "-",
            "tuning.targets": ",".join(self.targets) or "-",
            "tuning.notes": " | ".join(self.notes) or "-",
        }


def plan_tuning(model: torch.nn.Module, tuning: TuningConfig) -> TuningPlan:
    """Resolve ``tuning`` on ``model``'s architecture; raises ValueError when the method cannot apply.

    The error names the method, the model's class and model_type, the module names looked for,
    the names its linear layers do have, and the setting to change (tuning.target_modules, or
    tuning.method: regex with tuning.trainable_regex).
    """
    method = tuning.method
    if method in ("full", "regex"):
        return TuningPlan(method, model_type(model))
    if method in PRESET_ROLES:
        found, notes = _resolve_roles(model, method, PRESET_ROLES[method])
        return TuningPlan(method, model_type(model), tuple(p.name for p in found), tuple(notes))
    if method not in ("lora", "mora", "osf"):
        raise ValueError(f"unknown tuning.method {method!r}")
    # The Llama names are roles, found under each family's names; any other entry names modules itself.
    roles = [name for name in tuning.target_modules if name in ROLES]
    literal = [name for name in tuning.target_modules if name not in ROLES]
    found, notes = _resolve_roles(model, method, tuple(roles)) if roles else ([], [])
    paths = [path for path, _ in model.named_modules()]
    for name in literal:
        if not any(matches(path, name) for path in paths):
            raise ValueError(_cannot_apply(model, method, f"tuning.target_modules entry {name!r} matches no module"))
    targets = tuple(dict.fromkeys([p.name for p in found] + literal))
    if method in LINEAR_ONLY:
        _check_linear(model, method, targets)
    return TuningPlan(method, model_type(model), targets, tuple(notes))


def _resolve_roles(model: torch.nn.Module, method: str, roles: tuple[str, ...]) -> tuple[list[Projection], list[str]]:
    """The projections computing ``roles`` on this model, and the notes on how they differ from the request."""
    carrying = {role: [p for p in projections(model) if role in p.roles] for role in roles}
    counts = {role: sum(len(p.paths) for p in found) for role, found in carrying.items() if found}
    looked_for = ", ".join(f"{role} as {'/'.join(p.name for p in carrying[role]) or '(none)'}" for role in roles)
    if not any(counts.values()):
        raise ValueError(_cannot_apply(model, method, f"no module computes {', '.join(roles)} (looked for {looked_for})"))
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{role}: {count}" for role, count in counts.items())
        raise ValueError(_cannot_apply(
            model, method, f"some of the projections matched and others of the same request did not (modules found per "
            f"role: {found}; looked for {looked_for}), so it would train part of what it means"))
    notes = []
    found = list(dict.fromkeys(p for role in roles for p in carrying[role]))
    absent = [role for role in roles if role not in counts]
    if absent:
        notes.append(f"{model_type(model) or type(model).__name__} has no module computing {', '.join(absent)} (e.g. an MLP "
                     f"without a gate); {method} trains {', '.join(p.name for p in found)} only")
    for projection in found:
        extra = [role for role in projection.roles if role not in roles]
        if extra:
            notes.append(f"{projection.name} computes {', '.join(projection.roles)} in one fused layer; {method} adapts all of it, "
                         f"{', '.join(extra)} included, since its adapters wrap whole modules")
    return found, notes


def _check_linear(model: torch.nn.Module, method: str, targets: tuple[str, ...]) -> None:
    """MoRA and OSF wrap nn.Linear only: refuse any other target up front (OSF would skip it silently)."""
    tuner = LINEAR_ONLY[method]
    for path, module in model.named_modules():
        if not any(matches(path, name) for name in targets) or isinstance(module, torch.nn.Linear):
            continue
        if isinstance(module, torch.nn.Embedding):
            raise ValueError(f"tuning.method={method!r}: {tuner} does not apply to embeddings ({path} is an nn.Embedding); it "
                             f"adapts nn.Linear layers only. Remove it from tuning.target_modules, or use lora, which "
                             f"adapts embeddings too")
        raise ValueError(f"tuning.method={method!r}: {tuner} adapts nn.Linear layers only, and {path} is a "
                         f"{type(module).__module__}.{type(module).__name__}; use lora (it also wraps transformers' Conv1D), "
                         f"or a selective method (attn-proj, mlp-gate-up, regex)")


def _cannot_apply(model: torch.nn.Module, method: str, why: str) -> str:
    kind = model_type(model)
    leaf_names = sorted({path.rsplit(".", 1)[-1] for path, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})
    peft_hint = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(kind)
    hint = f"; peft's LoRA default for model_type {kind!r} is {peft_hint}" if peft_hint else ""
    return (f"tuning.method={method!r} cannot apply to {type(model).__name__} (model_type {kind!r}): {why}. Its linear "
            f"layers are named {leaf_names[:12]}{hint}. Set tuning.target_modules to the modules to adapt (lora, mora, "
            f"osf), or tuning.method: regex with tuning.trainable_regex naming the parameters to train")


def apply_tuning(model: torch.nn.Module, tuning: TuningConfig, plan: TuningPlan | None = None) -> torch.nn.Module:
    """Make exactly the parameters `tuning` asks for trainable; peft methods return a wrapped PeftModel.

    ``plan``: the `plan_tuning` of this model and config when the caller made it already (to
    record it); made here otherwise. Raises ValueError when the method cannot apply (see
    `plan_tuning`). Every note of the plan is logged as a warning.
    """
    plan = plan or plan_tuning(model, tuning)
    for note in plan.notes:
        log.warning("tuning.method=%s: %s", plan.method, note)
    method = tuning.method
    if method == "full":
        model.requires_grad_(True)
        return model
    if method in PRESET_ROLES:
        return _train_only_matching(model, method, tuple(rf"(^|\.){re.escape(name)}\." for name in plan.targets))
    if method == "regex":
        return _train_only_matching(model, method, tuple(tuning.trainable_regex))
    if method == "lora":
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=tuning.r, lora_alpha=tuning.alpha,
            lora_dropout=tuning.dropout, target_modules=list(plan.targets),
        )
        return _wrap(model, config)
    if method == "mora":
        # MoRA has no alpha: its update is not rescaled (as in the paper's reference code).
        config = MoraConfig(
            task_type=TaskType.CAUSAL_LM, r=tuning.r, mora_type=choose_mora_type(tuning.r, tuning.mora_type),
            mora_dropout=tuning.dropout, target_modules=list(plan.targets),
        )
        return _wrap(model, config)
    return _wrap(model, _osf_config(plan.targets))


def _wrap(model: torch.nn.Module, config: PeftConfig) -> PeftModel:
    untied = _untie_targeted_embeddings(model, config)
    try:
        return get_peft_model(model, config)
    except Exception:
        _retie(model, untied)  # a tuner that refuses a target leaves the model as it was
        raise


_Untied = tuple[torch.nn.Parameter, list[torch.nn.Module]]  # the shared matrix, the modules given a copy


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
    return shared, copied


def _retie(model: torch.nn.Module, untied: _Untied | None) -> None:
    """Undo `_untie_targeted_embeddings`: the modules share the original matrix again, and the config says so."""
    if untied is None:
        return
    shared, copied = untied
    for module in copied:
        module.weight = shared
    model.config.tie_word_embeddings = True


def _osf_config(targets: tuple[str, ...]):
    osf_config_cls = getattr(peft, "OSFConfig", None)
    if osf_config_cls is None:
        raise ValueError(
            f"tuning.method='osf' needs peft's OSF tuner (peft.OSFConfig), which the installed peft "
            f"{peft.__version__} does not provide; upgrade peft or choose another tuning.method"
        )
    # OSF's rank means the preserved (frozen) SVD rank, not a trainable rank like LoRA's r, so r is not
    # passed on: OSF's default keeps the top half of each matrix's singular directions frozen.
    return osf_config_cls(task_type=TaskType.CAUSAL_LM, target_modules=list(targets))


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
    every_name = [name for aliases in names.values() for name in aliases]
    unmatched = [pattern for pattern, regex in zip(patterns, compiled) if not any(map(regex.search, every_name))]
    if unmatched:
        # A pattern that matches nothing beside others that do is a partial match, not a smaller success.
        what = "no parameters" if len(unmatched) == len(patterns) else f"nothing for {unmatched} (the other patterns matched)"
        raise ValueError(
            f"tuning.method={method!r} matched {what} of {type(model).__name__} "
            f"(patterns: {list(patterns)}); its parameter names look like "
            f"{[name for name, _ in model.named_parameters()][:5]}"
        )
    for parameter, aliases in names.items():
        parameter.requires_grad_(any(regex.search(name) for regex in compiled for name in aliases))
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
