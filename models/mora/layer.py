"""The MoRA layer: a frozen nn.Linear plus x -> decompress(M · compress(x)) for each adapter.

The compress/decompress operators follow the reference implementation (kongds/MoRA):
- "sharing" (its type 1): cut the input into r̂-sized chunks and sum them; repeat M's r̂ outputs
  until d_out values are filled.
- "rotation" (its type 6): cut the input into r̂-sized chunks, rotate chunk j RoPE-style by angles
  j·θ, apply M to every chunk, concatenate the chunks and cut or repeat to d_out.
When d_in is not a multiple of r̂ the input is extended by repeating its first features (as the
reference does). The adapter's outputs (r̂ values for sharing, one r̂-block per chunk for rotation)
become d_out values by `decompress`: repeated from the start when there are fewer (as the reference
does), wrapped around and summed when there are more. The reference cuts the extra outputs off
instead, which on a projection with d_out < d_in (k_proj / v_proj of a GQA model, 576 -> 192;
down_proj) drops the outputs of whole chunks under rotation, so most input features (342 of 576)
never reached the update, and with r̂ > d_out it leaves rows of M without any effect.

Everything here is linear in x, so the merged weight is ΔW = operator(identity), exactly.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge

ROPE_BASE = 10000.0


def mora_rank(in_features: int, out_features: int, r: int) -> int:
    """r̂ = floor(sqrt((d_in + d_out) * r)): the largest square M with no more parameters than LoRA at rank r."""
    return math.isqrt((in_features + out_features) * r)


def cyclic_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Cut the last dimension to `size`, or extend it by repeating it from its start."""
    width = x.shape[-1]
    if size == width:
        return x
    if size < width:
        return x[..., :size]
    index = torch.arange(size, device=x.device) % width
    return x.index_select(-1, index)


def decompress(y: torch.Tensor, size: int) -> torch.Tensor:
    """The adapter's outputs as `size` values: repeated from the start when fewer, folded when more.

    Folding sums y[..., i + k*size] over k (the last group zero-padded), so every output of M, and
    through it every input feature, reaches the result; cutting (the reference) would drop them.
    """
    width = y.shape[-1]
    if width <= size:
        return cyclic_resize(y, size)
    groups = -(-width // size)
    return F.pad(y, (0, groups * size - width)).unflatten(-1, (groups, size)).sum(dim=-2)


def rotate_chunks(chunks: torch.Tensor) -> torch.Tensor:
    """RoPE over chunks: chunk j (dim -2) is rotated by angles j·θ_k in planes (k, k + r̂/2).

    Without it every chunk would see the same M (ΔW = I ⊗ M); distinct rotations let the chunks differ.
    With an odd r̂ the last feature has no partner and is left unrotated, so r̂ need not be rounded
    to even (which would give away up to 4r̂ parameters instead of < 2r̂ + 1).
    """
    num_chunks, width = chunks.shape[-2], chunks.shape[-1]
    half = width // 2
    exponents = torch.arange(0, 2 * half, 2, device=chunks.device).float() / max(2 * half, 1)
    inv_freq = 1.0 / ROPE_BASE**exponents
    angles = torch.outer(torch.arange(num_chunks, device=chunks.device).float(), inv_freq)
    cos, sin = angles.cos().to(chunks.dtype), angles.sin().to(chunks.dtype)
    first, second, unpaired = chunks[..., :half], chunks[..., half : 2 * half], chunks[..., 2 * half :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin, unpaired), dim=-1)


def mora_update(x: torch.Tensor, matrix: torch.Tensor, mora_type: str, out_features: int) -> torch.Tensor:
    """The adapter's contribution decompress(M · compress(x)) for inputs x of shape (..., d_in)."""
    rank = matrix.shape[0]
    num_chunks = -(-x.shape[-1] // rank)
    chunks = cyclic_resize(x, num_chunks * rank).unflatten(-1, (num_chunks, rank))
    if mora_type == "sharing":
        compressed = chunks.sum(dim=-2) @ matrix.T
    elif mora_type == "rotation":
        compressed = (rotate_chunks(chunks) @ matrix.T).flatten(-2)
    else:
        raise ValueError(f"unknown mora_type {mora_type!r}")
    return decompress(compressed, out_features)


class MoraLayer(BaseTunerLayer):
    # Names of the trainable adapter weights (peft saves, loads and freezes by these).
    adapter_layer_names = ("mora_M",)
    other_param_names = ("mora_r", "mora_type", "mora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.mora_r: dict[str, int] = {}
        self.mora_type: dict[str, str] = {}
        self.mora_dropout = nn.ModuleDict({})
        self.mora_M = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs

        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"MoRA supports nn.Linear layers only, got {type(self.get_base_layer()).__name__}")
        self.in_features, self.out_features = in_features, out_features

    def update_layer(
        self, adapter_name: str, r: int, mora_type: str, mora_dropout: float, inference_mode: bool = False, **kwargs
    ) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer, got {r}")
        rank = mora_rank(self.in_features, self.out_features, r)
        self.mora_r[adapter_name] = r
        self.mora_type[adapter_name] = mora_type
        self.mora_dropout[adapter_name] = nn.Dropout(p=mora_dropout) if mora_dropout > 0.0 else nn.Identity()
        # Zero start: the adapter adds nothing until trained, so the wrapped model equals the base model.
        self.mora_M[adapter_name] = nn.Parameter(torch.zeros(rank, rank))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def scale_layer(self, scale: float) -> None:
        if scale != 1:
            warnings.warn("MoRA has no scaling factor; scale_layer is ignored.")

    def unscale_layer(self, scale=None) -> None:
        pass


class MoraLinear(nn.Module, MoraLayer):
    """MoRA on top of an nn.Linear."""

    def __init__(self, base_layer, adapter_name: str, r: int, mora_type: str, mora_dropout: float = 0.0, **kwargs):
        super().__init__()
        MoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, mora_type=mora_type, mora_dropout=mora_dropout, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW (d_out × d_in) such that x @ ΔW.T equals the adapter's output: the operator applied to I."""
        matrix = self.mora_M[adapter]
        # Half-precision matmuls are slow or missing on CPU; merge in float32 there.
        half_on_cpu = matrix.device.type == "cpu" and matrix.dtype in (torch.float16, torch.bfloat16)
        compute_dtype = torch.float32 if half_on_cpu else matrix.dtype
        identity = torch.eye(self.in_features, device=matrix.device, dtype=compute_dtype)
        delta = mora_update(identity, matrix.to(compute_dtype), self.mora_type[adapter], self.out_features)
        return delta.T.to(matrix.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.mora_M:
                continue
            weight = self.get_base_weight()
            merged = weight + self.get_delta_weight(adapter).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter} seems to be broken")
            self.set_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.mora_M:
                weight = self.get_base_weight()
                self.set_base_weight(weight - self.get_delta_weight(adapter).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.mora_M:
                continue
            matrix = self.mora_M[adapter]
            adapter_input = self._cast_input_dtype(self.mora_dropout[adapter](x), matrix.dtype)
            result = result + mora_update(adapter_input, matrix, self.mora_type[adapter], self.out_features)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "mora." + super().__repr__()
