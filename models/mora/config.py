"""Configuration of the MoRA tuner, and the PEFT type it is registered under."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

MORA_TYPES = ("sharing", "rotation")

# Below this LoRA-equivalent rank the rotation operator is used, at or above it sharing. With sharing,
# all d_in / r̂ input chunks are summed into one r̂-vector, so a small r̂ collapses many features together
# and ΔW has rank ≤ r̂; rotation keeps the chunks apart (M acts on each chunk, under a different rotation),
# so ΔW can reach full rank even when r̂ is small. At large r there are few chunks, the sharing collapse
# costs little and it is the cheaper operator. The paper uses rotation at r=8 and sharing at r=256.
AUTO_ROTATION_BELOW_R = 32


def choose_mora_type(r: int, mora_type: str = "auto") -> str:
    """Resolve "auto" to a concrete operator: rotation when r < 32, sharing otherwise."""
    if mora_type == "auto":
        return "rotation" if r < AUTO_ROTATION_BELOW_R else "sharing"
    if mora_type not in MORA_TYPES:
        raise ValueError(f"mora_type must be one of {MORA_TYPES + ('auto',)}, got {mora_type!r}")
    return mora_type


def _ensure_peft_type(name: str) -> PeftType:
    """Add `name` to peft's closed PeftType enum if it is not there yet.

    `register_peft_method` only accepts names that are already PeftType members, and peft offers no
    public way to add one, so the member is added the way the enum machinery itself stores members.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # EnumType.__setattr__ forbids touching members, so go around it once, at creation.
    type.__setattr__(PeftType, name, member)
    return member


MORA_PEFT_TYPE = _ensure_peft_type("MORA")


@dataclass
class MoraConfig(PeftConfig):
    """MoRA (Jiang et al. 2024): one trainable square matrix M per adapted linear layer.

    For a layer with d_in inputs and d_out outputs, M is r̂ × r̂ with r̂ = floor(sqrt((d_in + d_out) * r)),
    so MoRA trains about as many parameters as LoRA of rank `r` (exactly: r̂² ≤ (d_in + d_out)·r and the
    shortfall is < 2r̂ + 1). M starts at zero, so the wrapped model starts identical to the base model.

    Args:
        r: LoRA-equivalent rank, used only to size r̂.
        mora_type: "sharing" (sum input chunks into one r̂-vector, repeat the output) or "rotation"
            (apply M to every r̂-chunk of the input, each chunk rotated RoPE-style first); "auto" is
            resolved by `choose_mora_type` when the config is created, so saved configs name a concrete type.
        mora_dropout: dropout on the adapter's input.
        target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save:
            as in every peft tuner.
    """

    r: int = field(default=8, metadata={"help": "LoRA-equivalent rank; M is floor(sqrt((d_in+d_out)*r)) square."})
    mora_type: Literal["sharing", "rotation", "auto"] = field(
        default="auto", metadata={"help": "'sharing', 'rotation', or 'auto' (rotation when r < 32)."}
    )
    mora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (list: exact or suffix match; str: regex) to adapt."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (list or regex) not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[str] = field(
        default=None, metadata={"help": "Layer pattern name, used with layers_to_transform."}
    )
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'mora_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides MoRA layers to train and save."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MORA_PEFT_TYPE
        if self.r < 1:
            raise ValueError(f"MoRA r must be a positive integer, got {self.r}")
        if not 0.0 <= self.mora_dropout < 1.0:
            raise ValueError(f"mora_dropout must be in [0, 1), got {self.mora_dropout}")
        self.mora_type = choose_mora_type(self.r, self.mora_type)
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError("layers_to_transform / layers_pattern cannot be used when target_modules is a regex str")
