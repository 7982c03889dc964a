"""Quantization conventions for INT8 attention, shared by the quantizer and every backend.

Scheme (SageAttention-style, with the options PARO needs):

* Q is split per (batch, head) into blocks of ``q_block`` tokens; each block gets one
  scale ``max|Q * sm_scale * log2(e)| / qmax`` and is rounded half away from zero to
  integers in [-qmax, qmax]. Folding ``sm_scale * log2(e)`` into Q's scale lets the
  kernel use ``exp2`` directly on the dequantized scores.
* K is smoothed first (its mean over tokens, per (batch, head, channel), is subtracted
  from a copy; softmax is invariant to that shift), then quantized per block of
  ``k_block`` tokens in the same way.
* ``qmax`` is 127 for ``qk=INT8`` and 7 for ``qk=INT4`` (INT4 range held in int8
  storage).
* P·V: ``pv=HALF`` keeps P and V in fp16 (or bf16 when the inputs are bf16) with fp32
  accumulation. ``pv=INT8`` quantizes P with the fixed scale 1/127 (P is in [0, 1] after
  subtracting the running row max) and V per (batch, head, channel) with
  ``max|V| / 127``.

One frozen :class:`QuantConfig` carries every one of these numbers; quantizer and
kernels read them from it and from nowhere else.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Union

import torch

__all__ = ["QKFormat", "PVFormat", "QuantConfig", "QuantizedQK", "resolve_quant", "quantize_qk",
           "quantize_v", "round_half_away", "LOG2E"]

LOG2E = 1.4426950408889634


class QKFormat(str, enum.Enum):
    INT8 = "int8"
    INT4 = "int4"


class PVFormat(str, enum.Enum):
    HALF = "half"   # fp16 / bf16 operands, fp32 accumulation
    INT8 = "int8"   # P with fixed scale 1/127, V per channel


@dataclass(frozen=True)
class QuantConfig:
    """Block sizes and formats of quantized attention (one source of truth).

    Args:
        qk: format of Q and K (``"int8"`` or ``"int4"``).
        pv: format of the P·V product (``"half"`` or ``"int8"``).
        q_block: tokens per Q scale (per batch and head).
        k_block: tokens per K scale.
        smooth_k: subtract K's token mean before quantizing.
        p_scale_inv: P is stored as ``round(P * p_scale_inv)`` when ``pv="int8"`` (127).
    """

    qk: QKFormat = QKFormat.INT8
    pv: PVFormat = PVFormat.HALF
    q_block: int = 128
    k_block: int = 64
    smooth_k: bool = True
    p_scale_inv: int = 127
    version: int = 1

    def __post_init__(self):
        try:
            object.__setattr__(self, "qk", QKFormat(self.qk))
        except ValueError:
            raise ValueError(f"QuantConfig.qk must be one of {[f.value for f in QKFormat]}, got {self.qk!r}") from None
        try:
            object.__setattr__(self, "pv", PVFormat(self.pv))
        except ValueError:
            raise ValueError(f"QuantConfig.pv must be one of {[f.value for f in PVFormat]}, got {self.pv!r}") from None
        for name in ("q_block", "k_block"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"QuantConfig.{name} must be a power of two >= 16, got {v!r}")
        if not (1 <= self.p_scale_inv <= 127):
            raise ValueError(f"QuantConfig.p_scale_inv must be in [1, 127], got {self.p_scale_inv}")

    @property
    def qk_max(self) -> int:
        """Largest integer magnitude of quantized Q and K (127 for INT8, 7 for INT4)."""
        return 127 if self.qk == QKFormat.INT8 else 7

    def to_json(self) -> str:
        d = asdict(self)
        d["qk"], d["pv"] = self.qk.value, self.pv.value
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls(**json.loads(text))


def resolve_quant(quant: Union[None, str, QuantConfig]) -> Optional[QuantConfig]:
    """Map the public ``quant=`` argument to a config (None means no quantization)."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, str):
        presets = {
            "int8": QuantConfig(),
            "int4": QuantConfig(qk="int4"),
            "int8-pv8": QuantConfig(pv="int8"),
            "int4-pv8": QuantConfig(qk="int4", pv="int8"),
        }
        if quant in presets:
            return presets[quant]
        raise ValueError(f"quant={quant!r} is not a known preset; use one of {sorted(presets)} or a QuantConfig")
    raise TypeError(f"quant must be None, a preset name or a QuantConfig, got {type(quant).__name__}")


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest integer, ties away from zero (the hardware cvt.rni differs: ties to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


class QuantizedQK(NamedTuple):
    """Quantized operands, laid out (batch, heads, seq, head_dim) for the kernels.

    q_int: int8 (B, H, Sq, D); q_scale: fp32 (B, H, ceil(Sq / q_block)) including sm_scale*log2(e).
    k_int: int8 (B, H, Sk, D); k_scale: fp32 (B, H, ceil(Sk / k_block)).
    """

    q_int: torch.Tensor
    q_scale: torch.Tensor
    k_int: torch.Tensor
    k_scale: torch.Tensor


def _quantize_blocks(x: torch.Tensor, block: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 (B, H, S, D) -> int8 (B, H, S, D), scale fp32 (B, H, ceil(S / block))."""
    b, h, s, d = x.shape
    nb = math.ceil(s / block)
    pad = nb * block - s
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    xb = xp.view(b, h, nb, block, d)
    amax = xb.abs().amax(dim=(-1, -2))
    scale = amax / qmax
    # An all-zero block keeps scale 0 and quantizes to zeros.
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    qi = round_half_away(xb * inv[..., None, None]).clamp_(-qmax, qmax).to(torch.int8)
    return qi.view(b, h, nb * block, d)[:, :, :s].contiguous(), scale.contiguous()


def quantize_qk(q: torch.Tensor, k: torch.Tensor, cfg: QuantConfig, sm_scale: float) -> QuantizedQK:
    """Quantize Q and K.

    Args:
        q: (B, Sq, H, D); k: (B, Sk, H, D), any float dtype (inputs are never modified).
        sm_scale: softmax scale (usually D**-0.5), folded into Q's scale with log2(e).
    """
    qf = q.detach().float().transpose(1, 2) * (sm_scale * LOG2E)
    kf = k.detach().float().transpose(1, 2)
    if cfg.smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)
    q_int, q_scale = _quantize_blocks(qf, cfg.q_block, cfg.qk_max)
    k_int, k_scale = _quantize_blocks(kf, cfg.k_block, cfg.qk_max)
    return QuantizedQK(q_int, q_scale, k_int, k_scale)


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V per (batch, head, channel) for INT8 P·V.

    Args:
        v: (B, Sk, H, D).
    Returns:
        v_int int8 (B, H, Sk, D) and v_scale fp32 (B, H, D) with ``V ~= v_int * v_scale``.
    """
    vf = v.detach().float().transpose(1, 2)
    scale = vf.abs().amax(dim=2) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    v_int = round_half_away(vf * inv[:, :, None, :]).clamp_(-127, 127).to(torch.int8)
    return v_int.contiguous(), scale.contiguous()
