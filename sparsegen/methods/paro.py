"""PARO: per-head token reordering, calibrated static block masks, INT8/INT4 attention.

Each head's attention pattern ("the same pixel across frames", "the same row", ...)
becomes block-diagonal once the video tokens are laid out in the right one of the six
orders of (F, H, W) (:mod:`sparsegen.reorder`). A **plan**, made offline by
:func:`sparsegen.calibrate` on one or two prompts, fixes per (layer, head) the order and
per (step bucket, layer, head) a block mask over the reordered tokens. Per call::

    q, k, v (B, N, H, D) --reorder each head--> block-sparse attention with the plan's
    mask of (bucket of this step, layer) [INT8/INT4 optional] --inverse reorder--> out

Text tokens of joint models are attended densely by :mod:`sparsegen.joint`, as for every
method. Step buckets are fractions of the schedule: the plan's calibration steps in
the first half each have their own mask (or groups of them), the second half shares one
(as published), and a generation with another number of steps is mapped by progress.

A plan is tied to its model and geometry: loading it on a transformer of another class
or layer/head count, or running a token grid other than the calibrated one, is refused
with an error that names both.

Files (``plan.save(dir)``; never pickle)::

    dir/plan.json          metadata: format, version, model class, grid, layers, heads,
                           block size, buckets, density, prompts, orders, order weight
    dir/plan.safetensors   orders int8 (L, H) index into ORDERS; masks uint8 (NB, L, H,
                           Qb, ceil(Kb / 8)) bit-packed rows (most significant bit
                           first); order metrics f32 (L, H, 6) for auditing the choice
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence, Union

import torch

from ..kernels import BlockSparseMask
from ..kernels.mask import block_count
from ..reorder import ORDERS, reordered_attention
from .base import AttentionCall, AttentionGeometry, MethodConfig, SparseAttentionMethod, config_error, global_heads

__all__ = ["PAROConfig", "PAROMethod", "ParoPlan", "load_plan", "QUANT_CHOICES", "PLAN_FORMAT_VERSION",
           "pack_bits", "unpack_bits"]

PLAN_FORMAT = "sparsegen-paro-plan"
PLAN_FORMAT_VERSION = 1
PLAN_JSON, PLAN_TENSORS = "plan.json", "plan.safetensors"
# Quantized attention presets of the engine PARO offers (None: 16-bit attention).
QUANT_CHOICES = (None, "int8", "int8-pv8", "int4", "int4-pv8")


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 (..., ceil(K / 8)) from bool (..., K), most significant bit first."""
    k = bits.shape[-1]
    pad = (-k) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(*bits.shape[:-1], -1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (b * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """bool (..., k) from :func:`pack_bits` output."""
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :k].bool()


@dataclass
class ParoPlan:
    """A calibrated PARO plan for one transformer and one token grid.

    Args:
        model_class: class name of the transformer it was calibrated on.
        grid: (frames, height, width) video token grid after patchify.
        num_layers, num_heads: patched self-attention layers and heads per layer.
        block_size: query and key block size of the masks (64 in the paper).
        orders: per layer, per head, one of :data:`~sparsegen.reorder.ORDERS`.
        masks: bool (NB, L, H, Qb, Kb) over the reordered tokens, NB step buckets.
        buckets: per bucket (start, end) as fractions of the denoising schedule
            (0 <= start < end <= 1, contiguous, covering [0, 1]).
        calibration_steps: denoising steps of the calibration run.
        density: target share of visited blocks per bucket (over all layers and heads).
        prompts: calibration prompts (for the record).
        order_weight: weight of sparsity against uniformity in the order choice.
        metrics: audit of the order choice, f32 (L, H, 6) each: ``sparse_share``,
            ``uniformity`` (mean block max/mean), ``cost`` (lower wins).
        path: the directory it was loaded from or saved to, if any.
    """

    model_class: str
    grid: tuple[int, int, int]
    num_layers: int
    num_heads: int
    block_size: int
    orders: tuple[tuple[str, ...], ...]
    masks: torch.Tensor
    buckets: tuple[tuple[float, float], ...]
    calibration_steps: int
    density: float
    prompts: tuple[str, ...] = ()
    order_weight: float = 0.5
    metrics: dict = field(default_factory=dict)
    path: Optional[str] = None

    def __post_init__(self):
        self.grid = tuple(int(n) for n in self.grid)
        self.masks = self.masks.cpu()  # the host copy; methods move one bucket at a time to the device
        self.orders = tuple(tuple(o) for o in self.orders)
        self.buckets = tuple((float(a), float(b)) for a, b in self.buckets)
        n = self.grid[0] * self.grid[1] * self.grid[2]
        nb = block_count(n, self.block_size)
        expect = (len(self.buckets), self.num_layers, self.num_heads, nb, nb)
        if self.masks.dtype != torch.bool or tuple(self.masks.shape) != expect:
            raise ValueError(f"plan masks must be bool {expect} (buckets, layers, heads, Qb, Kb) for grid {self.grid} "
                             f"and block {self.block_size}; got {self.masks.dtype} {tuple(self.masks.shape)}")
        if len(self.orders) != self.num_layers or any(len(r) != self.num_heads for r in self.orders):
            raise ValueError(f"plan orders must be {self.num_layers} layers x {self.num_heads} heads")
        bad = {o for r in self.orders for o in r if o not in ORDERS}
        if bad:
            raise ValueError(f"plan orders {sorted(bad)} are not among {ORDERS}")
        edges = [b for bucket in self.buckets for b in bucket]
        if (not self.buckets or edges[0] != 0.0 or edges[-1] != 1.0
                or any(a >= b for a, b in self.buckets)
                or any(self.buckets[i][1] != self.buckets[i + 1][0] for i in range(len(self.buckets) - 1))):
            raise ValueError(f"plan buckets must be contiguous (start, end) fractions covering [0, 1], got {self.buckets}")

    # ---------------------------------------------------------------- lookup
    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def bucket_index(self, step: Optional[int], num_steps: Optional[int]) -> int:
        """The bucket of denoising ``step`` of ``num_steps`` (calibration steps when None)."""
        if step is None:
            return 0
        total = num_steps or self.calibration_steps
        progress = min(max(step / total, 0.0), 1.0)
        for i, (_, end) in enumerate(self.buckets):
            if progress < end:
                return i
        return len(self.buckets) - 1

    def bucket_densities(self) -> list[float]:
        """Share of visited blocks of each bucket over all its layers and heads."""
        return [float(m.float().mean()) for m in self.masks]

    def describe_geometry(self) -> str:
        return (f"{self.model_class} with {self.num_layers} layers x {self.num_heads} heads, token grid "
                f"{self.grid} (frames, height, width)")

    def check_geometry(self, grid: Sequence[int]) -> None:
        if tuple(grid) != self.grid:
            raise ValueError(
                f"this PARO plan was calibrated for the token grid {self.grid} (frames, height, width) but the "
                f"pipeline now runs {tuple(grid)}: calibrate a plan at this resolution and frame count "
                "(sparsegen.calibrate(pipe, 'paro', height=..., width=..., num_frames=...))"
            )

    def check_model(self, model_class: str, num_layers: int, num_heads: Optional[int] = None) -> None:
        if model_class != self.model_class or num_layers != self.num_layers or (
                num_heads is not None and num_heads != self.num_heads):
            heads = f" x {num_heads} heads" if num_heads is not None else ""
            raise ValueError(
                f"this PARO plan was made for {self.describe_geometry()}, not for {model_class} with {num_layers} "
                f"layers{heads}: calibrate a plan on this model (sparsegen.calibrate(pipe, 'paro', ...))"
            )

    def layer_mask(self, bucket: int, layer: int) -> BlockSparseMask:
        """The mask of one (bucket, layer), layout (1, H, Qb, Kb) over the reordered tokens."""
        n = self.num_tokens
        return BlockSparseMask.from_block_matrix(self.masks[bucket, layer][None], q_len=n, kv_len=n,
                                                 q_block_size=self.block_size, kv_block_size=self.block_size)

    # ------------------------------------------------------------------ files
    def save(self, directory: Union[str, os.PathLike]) -> str:
        """Write ``plan.json`` and ``plan.safetensors`` into ``directory`` (created); returns it."""
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        kb = self.masks.shape[-1]
        tensors = {
            "orders": torch.tensor([[ORDERS.index(o) for o in row] for row in self.orders], dtype=torch.int8),
            "masks": pack_bits(self.masks.cpu()).contiguous(),
        }
        for name, t in self.metrics.items():
            tensors[f"metric.{name}"] = t.detach().float().cpu().contiguous()
        save_file(tensors, os.path.join(directory, PLAN_TENSORS))
        meta = {
            "format": PLAN_FORMAT, "format_version": PLAN_FORMAT_VERSION, "method": "paro",
            "model_class": self.model_class, "grid": list(self.grid), "num_layers": self.num_layers,
            "num_heads": self.num_heads, "block_size": self.block_size, "key_blocks": kb,
            "buckets": [list(b) for b in self.buckets], "calibration_steps": self.calibration_steps,
            "density": self.density, "bucket_densities": [round(d, 6) for d in self.bucket_densities()],
            "prompts": list(self.prompts), "order_weight": self.order_weight,
            "orders": [list(r) for r in self.orders],
        }
        with open(os.path.join(directory, PLAN_JSON), "w") as f:
            json.dump(meta, f, indent=1)
        self.path = directory
        return directory


def load_plan(directory: Union[str, os.PathLike]) -> ParoPlan:
    """Read a plan written by :meth:`ParoPlan.save` (or ``sparsegen calibrate paro --out``).

    Raises:
        ValueError: not a plan directory, another format or a newer format version,
            inconsistent contents.
    """
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    meta_path, tensor_path = os.path.join(directory, PLAN_JSON), os.path.join(directory, PLAN_TENSORS)
    if not (os.path.isfile(meta_path) and os.path.isfile(tensor_path)):
        raise ValueError(f"{directory!r} is not a PARO plan directory (it needs {PLAN_JSON} and {PLAN_TENSORS}; "
                         "write one with sparsegen.calibrate(pipe, 'paro', ...).save(dir) or `sparsegen calibrate "
                         "paro --out dir`)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != PLAN_FORMAT:
        raise ValueError(f"{meta_path} is not a PARO plan (format {meta.get('format')!r})")
    if meta.get("format_version") != PLAN_FORMAT_VERSION:
        raise ValueError(f"{meta_path} has plan format version {meta.get('format_version')!r}; this sparsegen reads "
                         f"version {PLAN_FORMAT_VERSION}: recalibrate with this release")
    tensors = load_file(tensor_path)
    orders = [[ORDERS[int(i)] for i in row] for row in tensors["orders"].tolist()]
    masks = unpack_bits(tensors["masks"], int(meta["key_blocks"]))
    metrics = {k[len("metric."):]: v for k, v in tensors.items() if k.startswith("metric.")}
    return ParoPlan(model_class=meta["model_class"], grid=tuple(meta["grid"]), num_layers=int(meta["num_layers"]),
                    num_heads=int(meta["num_heads"]), block_size=int(meta["block_size"]), orders=orders, masks=masks,
                    buckets=[tuple(b) for b in meta["buckets"]], calibration_steps=int(meta["calibration_steps"]),
                    density=float(meta["density"]), prompts=tuple(meta.get("prompts", ())),
                    order_weight=float(meta.get("order_weight", 0.5)), metrics=metrics, path=directory)


@dataclass(frozen=True)
class PAROConfig(MethodConfig):
    """PARO attention from a calibrated plan.

    Args:
        plan: a :class:`ParoPlan` (from :func:`sparsegen.calibrate`) or its directory.
        quant: ``None`` (16-bit attention), ``"int8"`` (INT8 Q·K, fp16/bf16 P·V),
            ``"int8-pv8"`` (INT8 Q·K and P·V), ``"int4"`` (INT4-range Q·K) or ``"int4-pv8"``.
        reorder: lay tokens out in the plan's per-head orders (False: the plan's masks
            are still used, over tokens in their original order; for ablations, and
            meaningful only for plans calibrated without reordering).
        (and the shared schedule options of :class:`MethodConfig`)

    Raises:
        ValueError: no plan, a directory that holds no plan, an unknown ``quant``.
    """

    method: ClassVar[str] = "paro"
    plan: Union[None, str, ParoPlan] = None
    quant: Optional[str] = None
    reorder: bool = True

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.plan is None:
            raise config_error(name, "plan", None, "PARO needs a calibrated plan: pass plan=sparsegen.calibrate(pipe, "
                               "'paro', ...) or the directory it was saved to")
        if isinstance(self.plan, (str, os.PathLike)):
            object.__setattr__(self, "plan", load_plan(self.plan))
        elif not isinstance(self.plan, ParoPlan):
            raise config_error(name, "plan", type(self.plan).__name__, "must be a ParoPlan or a plan directory")
        if self.quant not in QUANT_CHOICES:
            raise config_error(name, "quant", self.quant, f"must be one of {list(QUANT_CHOICES)}")
        if not isinstance(self.reorder, bool):
            raise config_error(name, "reorder", self.reorder, "must be True or False")

    def to_dict(self) -> dict:
        d = super().to_dict()
        # The plan is referred to by its directory (tensors never go into JSON).
        d["plan"] = self.plan.path
        return d


def refuse_models_a_plan_cannot_serve(what: str, model_class: str, transformer_index: int,
                                      multi_resolution: bool) -> None:
    """Raise ValueError for models one PARO plan cannot cover: a pipeline's second
    transformer (Wan 2.2 A14B) and models attending at several token grids (UNets)."""
    if transformer_index > 0:
        raise ValueError(f"{what} covers one transformer; pipelines with two (Wan 2.2 A14B) are not supported by "
                         "PARO yet")
    if multi_resolution:
        raise ValueError(f"{model_class} attends at several token resolutions (a UNet's levels) and a PARO plan "
                         "holds one token grid: PARO serves diffusion transformers; use 'gna' or 'agent' here")


class PAROMethod(SparseAttentionMethod):
    config_cls = PAROConfig
    uses_step = True

    @property
    def plan(self) -> ParoPlan:
        return self.config.plan

    def check_model(self, *, model_class: str, num_layers: int, transformer_index: int,
                    multi_resolution: bool = False) -> None:
        refuse_models_a_plan_cannot_serve("a PARO plan", model_class, transformer_index, multi_resolution)
        self.plan.check_model(model_class, num_layers)

    def check_geometry(self, geometry: AttentionGeometry) -> None:
        self.plan.check_geometry(geometry.grid)

    def prepare(self, geometry: AttentionGeometry, device) -> None:
        self._bucket_masks(0, device)

    def _bucket_masks(self, bucket: int, device) -> list[tuple[BlockSparseMask, float]]:
        """Per layer of one step bucket: (mask on ``device``, its density).

        Only one bucket's masks are held per device (a real model's plan holds dozens of
        buckets of L x H x Qb x Kb blocks; their index layouts together would not fit next
        to the model). They are built from the plan's host copy when a generation enters
        the bucket, once per bucket and generation; nothing is read back from the device.
        """
        key = ("bucket-masks", str(device))
        held = self._cache.get(key)
        if held is None or held[0] != bucket:
            for old in [k for k in self._cache if k[0] == "head-mask" and k[1] != bucket]:
                del self._cache[old]  # head-parallel masks of other buckets
            plan = self.plan
            density = plan.masks[bucket].float().mean((1, 2, 3))
            held = (bucket, [(plan.layer_mask(bucket, l).to(device), float(density[l]))
                             for l in range(plan.num_layers)])
            self._cache[key] = held
        return held[1]

    def attention(self, q, k, v, call: AttentionCall):
        plan = self.plan
        heads = call.total_heads if call.total_heads is not None else q.shape[2]
        if heads != plan.num_heads or call.num_layers != plan.num_layers:
            raise ValueError(f"this PARO plan was made for {plan.describe_geometry()}; the model runs "
                             f"{call.num_layers} layers x {heads} heads: calibrate a plan on this model")
        bucket = plan.bucket_index(call.step, call.num_steps)
        mask, density = self._bucket_masks(bucket, q.device)[call.layer]
        heads = global_heads(call, q.shape[2])
        if heads != list(range(plan.num_heads)):
            mask = self._head_mask(bucket, call.layer, tuple(heads), q.device)
        call.stats["density"] = density
        if not self.config.reorder:
            from ..kernels import block_sparse_attention

            return block_sparse_attention(q, k, v, mask, return_lse=True, quant=self.config.quant,
                                          backend=call.backend)
        return reordered_attention(q, k, v, mask, grid=plan.grid, order=[plan.orders[call.layer][h] for h in heads],
                                   return_lse=True, quant=self.config.quant, backend=call.backend)

    def _head_mask(self, bucket: int, layer: int, heads: tuple, device) -> BlockSparseMask:
        """The (bucket, layer) mask of some heads (head-parallel ranks), built from the plan's host copy."""
        def build():
            plan, n = self.plan, self.plan.num_tokens
            return BlockSparseMask.from_block_matrix(plan.masks[bucket, layer, list(heads)][None], q_len=n, kv_len=n,
                                                     q_block_size=plan.block_size,
                                                     kv_block_size=plan.block_size).to(device)
        return self.cached(("head-mask", bucket, layer, heads, str(device)), build)

    def head_work(self, geometry: AttentionGeometry, call: AttentionCall):
        bucket = self.plan.bucket_index(call.step, call.num_steps)
        # Summed once per (bucket, layer) from the plan's host copy: no device read.
        return self.cached(("head-work", bucket, call.layer),
                           lambda: self.plan.masks[bucket, call.layer].sum((-1, -2)).tolist())
