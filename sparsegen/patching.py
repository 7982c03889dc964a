"""``sparsegen.apply``: patch a diffusers pipeline (or bare transformer) with a method.

One interception mechanism serves every adapter:

* diffusers' attention processors call ``dispatch_attention_fn``, a name in their own
  module. While at least one handle is active, that name points to a trampoline that
  forwards every call unchanged to the original unless the current call comes from a
  layer a handle patched.
* a forward pre-hook and an always-called forward hook on each patched attention
  module push and pop "this layer of this handle is running" on a per-thread stack (so
  two pipelines in one process, threads and re-entrancy are kept apart);
* a forward pre-hook on each transformer reads the token grid from its inputs on every
  call (masks are never stale) and has the method prepare that geometry;
* the denoising step is counted on the pipeline's scheduler: ``set_timesteps`` starts
  a generation, each ``step`` call ends a denoising step (classifier-free-guidance
  passes, and Wan 2.2's two transformers, share the step). A bare transformer counts
  distinct timesteps instead, or is told its step with :meth:`SparseHandle.set_step`.

Nothing on the attention path reads device values back to the host: the schedule is
decided on the host between steps, and statistics (density) accumulate in device
tensors until :meth:`SparseHandle.step_densities` is called. So a patched transformer
compiles with ``torch.compile(fullgraph=True)`` (static shapes; see ``apply``).

All state lives on the :class:`SparseHandle`; ``remove()`` restores every object.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import types
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .joint import sparse_self_attention
from .parallel import (contiguous_head_assignment, greedy_head_assignment, greedy_head_assignment_tensor, joint_order,
                       rank_imbalance, rank_imbalance_tensor)
from .methods import MethodConfig, SparseAttentionMethod, config_class
from .methods.base import AttentionCall, AttentionGeometry
from .patches import ModelAdapter, TextLayout, adapter_for

__all__ = ["apply", "SparseHandle", "make_config"]

logger = logging.getLogger("sparsegen")

@dataclass(frozen=True)
class _Route:
    handle: "SparseHandle"
    layer: int
    module_name: str


class _RunningLayers(threading.local):
    """Per thread, the stack of patched layers currently running (innermost last).

    A thread-local object rather than a context variable: torch.compile traces its
    pushes and pops, so a patched model compiles without graph breaks.
    """

    def __init__(self):
        self.stack: list[_Route] = []


_RUNNING = _RunningLayers()


@dataclass(frozen=True)
class _EntryPoint:
    """A name through which attention processors reach the attention kernel.

    Args:
        global_name: the name in the processor's module namespace.
        attribute: None when ``global_name`` is the attention function itself; else the
            function is this attribute of the module bound to ``global_name`` (``F`` ->
            ``torch.nn.functional``), and the name is pointed at a copy of that module
            whose attribute is the trampoline.
        heads_first: q, k, v and the output are laid out (B, H, S, D) (SDPA) rather
            than (B, S, H, D) (diffusers' ``dispatch_attention_fn``).
        parameters: parameter names in positional order, when they cannot be read from
            the function's signature (builtins); None: read them.
    """

    global_name: str
    attribute: Optional[str] = None
    heads_first: bool = False
    parameters: Optional[tuple[str, ...]] = None


# diffusers' processors for Wan, HunyuanVideo, LTX, FLUX, SkyReels-V2 ...
_DISPATCH = _EntryPoint("dispatch_attention_fn")
# Processors calling ``F.scaled_dot_product_attention`` directly (CogVideoX, Mochi,
# Allegro, SD's AttnProcessor2_0): ``F`` is ``torch.nn.functional`` in their module.
_SDPA = _EntryPoint("F", "scaled_dot_product_attention", heads_first=True,
                    parameters=("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                                "enable_gqa"))
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


class _Trampolines:
    """Reference-counted redirection of attention entry points in processor modules.

    This registry holds only the bookkeeping of the shared trampolines (which module
    namespaces are redirected and how many handles use each), never per-pipeline state.
    """

    _lock = threading.Lock()
    _installed: dict[tuple[int, str], tuple[dict, Any, int]] = {}

    @classmethod
    def acquire(cls, namespace: dict, entry: _EntryPoint) -> None:
        with cls._lock:
            key = (id(namespace), entry.global_name)
            if key in cls._installed:
                ns, original, n = cls._installed[key]
                cls._installed[key] = (ns, original, n + 1)
                return
            original = namespace[entry.global_name]
            if entry.attribute is None:
                namespace[entry.global_name] = _make_trampoline(original, entry)
            else:
                namespace[entry.global_name] = _module_with_trampoline(original, entry)
            cls._installed[key] = (namespace, original, 1)

    @classmethod
    def release(cls, namespace: dict, entry: _EntryPoint) -> None:
        with cls._lock:
            key = (id(namespace), entry.global_name)
            ns, original, n = cls._installed[key]
            if n > 1:
                cls._installed[key] = (ns, original, n - 1)
            else:
                ns[entry.global_name] = original
                del cls._installed[key]


def _module_with_trampoline(module: types.ModuleType, entry: _EntryPoint) -> types.ModuleType:
    """A copy of ``module`` (same function objects) whose ``entry.attribute`` is the trampoline.

    Only the processor module's own name is redirected; ``torch.nn.functional`` itself is
    never modified, so code elsewhere is untouched.
    """
    proxy = types.ModuleType(module.__name__, module.__doc__)
    proxy.__dict__.update(module.__dict__)
    setattr(proxy, entry.attribute, _make_trampoline(getattr(module, entry.attribute), entry))
    proxy.__sparsegen_original__ = module
    return proxy


def _make_trampoline(original, entry: _EntryPoint):
    # Parameter names in order, read once: binding by hand keeps the call traceable.
    if entry.parameters is not None:
        positional, defaults = list(entry.parameters), dict(_SDPA_DEFAULTS)
    else:
        params = inspect.signature(original).parameters
        positional = [n for n, p in params.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
    heads_first = entry.heads_first

    @functools.wraps(original)
    def sparsegen_attention(*args, **kwargs):
        stack = _RUNNING.stack
        if not stack or stack[-1].handle._removed:
            return original(*args, **kwargs)
        arguments = dict(defaults)
        arguments.update(zip(positional, args))
        arguments.update(kwargs)
        if heads_first:
            for name in ("query", "key", "value"):
                arguments[name] = arguments[name].transpose(1, 2)
        out = stack[-1].handle._attend(stack[-1], arguments)
        if out is None:  # this call runs the model's own attention
            return original(*args, **kwargs)
        return out.transpose(1, 2) if heads_first else out

    sparsegen_attention.__sparsegen_original__ = original
    return sparsegen_attention


def _is_functional(obj) -> bool:
    return obj is torch.nn.functional or getattr(obj, "__sparsegen_original__", None) is torch.nn.functional


def _processor_entry(module: torch.nn.Module, name: str) -> tuple[dict, _EntryPoint]:
    """The namespace and entry point through which ``module``'s processor reaches attention.

    Read from the names the processor's ``__call__`` uses: ``dispatch_attention_fn``, or
    ``scaled_dot_product_attention`` as an attribute of a name bound to
    ``torch.nn.functional`` in its module.
    """
    proc = getattr(module, "processor", None)
    call = getattr(type(proc), "__call__", None)
    ns = getattr(call, "__globals__", None)
    used = set(getattr(getattr(call, "__code__", None), "co_names", ()))
    if ns is not None:
        if _DISPATCH.global_name in used and _DISPATCH.global_name in ns:
            return ns, _DISPATCH
        if _SDPA.attribute in used and _SDPA.global_name in used and _is_functional(ns.get(_SDPA.global_name)):
            return ns, _SDPA
    raise ValueError(
        f"the attention processor {type(proc).__name__} of module '{name}' reaches attention neither through "
        f"diffusers' {_DISPATCH.global_name} nor through F.scaled_dot_product_attention, so sparsegen cannot "
        "intercept it. Restore the model's default processors (e.g. `transformer.set_attn_processor(...)` with its "
        "stock processor class) and apply again."
    )


def _is_compiled(module: torch.nn.Module) -> bool:
    if type(module).__name__ == "OptimizedModule" or hasattr(module, "_orig_mod"):
        return True
    return getattr(module, "_compiled_call_impl", None) is not None


def make_config(method: Union[str, MethodConfig], **options) -> MethodConfig:
    """A method config from a name and options, or the config itself (no options then)."""
    if isinstance(method, MethodConfig):
        if options:
            raise TypeError(
                f"pass options either in the config or as keyword arguments, not both (got {sorted(options)})"
            )
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name, a MethodConfig or a SparseAttentionMethod, got "
                        f"{type(method).__name__}")
    return config_class(method).from_dict({"method": method, **options})


class SparseHandle:
    """A patched pipeline or transformer. Use ``remove()`` or a ``with`` block to restore it.

    Attributes:
        config: the method config.
        method: the method object (holds mask caches for this pipeline only).
        adapter: the model adapter in use.
        step, num_steps: the current denoising step (0-based) and the generation's total,
            when known.
        step_stats: per finished step, {"step", "density_sum", "sparse_calls",
            "dense_calls"} as 0-dim device tensors (read them with :meth:`step_densities`,
            or ``float``/``int`` them yourself between steps), plus the step in progress.
        parallel_stats: under context parallelism, per layer (of the transformer that ran it
            last, ``transformer``: 0, or 1 for a pipeline's second): ``ranks`` and ``imbalance``
            (max / mean of the ranks' visited blocks); Ulysses adds ``imbalance_contiguous``
            and ``heads_per_rank`` (host values when the per-head work is known on the host,
            e.g. PARO's plan; device tensors plus ``head_work`` (H,) when it is known only
            per call, e.g. VMoBA), ring adds ``rank_blocks`` (per rank's query shard).
    """

    def __init__(self, target, method: SparseAttentionMethod):
        if not isinstance(method, SparseAttentionMethod):
            raise TypeError(f"method must be a SparseAttentionMethod, got {type(method).__name__}")
        self.method = method
        self.config = method.config
        self._removed = False
        self._hooks: list = []
        self._entries: list[tuple[dict, _EntryPoint]] = []
        self._scheduler_patches: list[tuple[Any, str, Any]] = []
        self._transformers: list[torch.nn.Module] = []
        self._pipeline = None
        # Denoising-step state, decided on the host between steps.
        self.step: Optional[int] = None
        self.num_steps: Optional[int] = None
        self._step_is_dense = False
        self._counts_scheduler_steps = False
        self._forwards_since_step = 0  # transformer forwards since the last scheduler step
        self._steps_given = False
        self._last_timestep: Optional[float] = None
        self._geometry: dict[int, AttentionGeometry] = {}
        self._grid_cache: dict = {}  # adapters that read the grid from position ids keep it here
        self._geometry_errors: dict = {}  # geometries the method refused: raised only before a sparse call
        self._attributes: list[tuple[str, torch.nn.Module]] = []  # (pipeline attribute, transformer patched)
        self.detached = False
        # Context parallelism's per-rank work, per layer (see the README's "Load balance").
        self.parallel_stats: dict[int, dict] = {}
        # Ulysses with work known per call: (transformer, layer) -> the last call's (H,) head work;
        # per transformer, (last layer served, {layer: device (order, inverse)}) of the forward running.
        self._call_work: dict[tuple[int, int], torch.Tensor] = {}
        self._balanced_orders: dict[int, tuple[int, dict]] = {}
        # Host-known head assignments (-> heads per rank, device (order, inverse), stats) and
        # joint segment maps (-> device (order, inverse)), cached.
        self._head_orders: dict = {}
        self._levels: dict[int, dict] = {}  # UNets: per transformer, token count -> (geometry, downsample, rank)
        self._levels_key: dict[int, tuple] = {}
        self._current_transformer = 0
        self._prepared: set = set()
        self._finished_steps: list[dict] = []
        # Per-call statistics of the step in progress, accumulated on the device in place
        # ([density sum, sparse calls, dense calls]); set aside at each step boundary.
        self._step_totals: Optional[torch.Tensor] = None
        self._install(target)

    # ------------------------------------------------------------------ install
    def _find_transformers(self, target) -> list[tuple[torch.nn.Module, ModelAdapter]]:
        if isinstance(target, torch.nn.Module):
            if _is_compiled(target):
                raise ValueError(
                    "this transformer is already compiled with torch.compile; call sparsegen.apply before "
                    "torch.compile (compile the patched model afterwards)"
                )
            return [(target, adapter_for(target))]
        found, candidates = [], []
        for attr in ("transformer", "transformer_2", "unet"):
            t = getattr(target, attr, None)
            if t is None:
                continue
            candidates.append(attr)
            if _is_compiled(t):
                raise ValueError(
                    f"pipe.{attr} is already compiled with torch.compile; call sparsegen.apply before "
                    "torch.compile (compile the patched model afterwards)"
                )
            a = adapter_for(t)
            if attr in a.transformer_attributes:
                found.append((t, a))
                self._attributes.append((attr, t))
        if not found:
            if candidates:
                raise ValueError(f"{type(target).__name__}: no patchable transformer among {candidates}")
            from .patches import supported_models

            names = ", ".join(f"{m['name']} ({', '.join(m['pipelines'])})" for m in supported_models())
            raise ValueError(
                f"{type(target).__name__} has no `transformer` attribute; pass a diffusers pipeline or its "
                f"transformer. Supported models: {names}"
            )
        self._pipeline = target
        return found

    def _install(self, target) -> None:
        pairs = self._find_transformers(target)
        for t, _ in pairs:
            if getattr(t, "_sparsegen_handle", None) is not None:
                raise ValueError(
                    f"{type(t).__name__} is already patched by sparsegen (config {t._sparsegen_handle.config!r}); "
                    "call handle.remove() first, then apply again"
                )
        try:
            for tidx, (t, adapter) in enumerate(pairs):
                self._install_transformer(tidx, t, adapter)
            self._patch_scheduler()
        except Exception:
            self.remove()
            raise

    def _install_transformer(self, tidx: int, transformer, adapter: ModelAdapter) -> None:
        modules = adapter.attention_modules(transformer)
        if not modules:
            raise ValueError(
                f"adapter '{adapter.name}' found no self-attention modules matching "
                f"{adapter.self_attention_pattern!r} in {type(transformer).__name__}"
            )
        self.adapter = adapter
        self._transformers.append(transformer)
        transformer._sparsegen_handle = self
        for layer, (name, module) in enumerate(modules):
            ns, entry = _processor_entry(module, name)
            if not any(ns is n and entry == e for n, e in self._entries):
                _Trampolines.acquire(ns, entry)
                self._entries.append((ns, entry))
            route = _Route(self, layer, name)

            def push(mod, args, route=route):
                _RUNNING.stack.append(route)

            def pop(mod, args, output, route=route):
                stack = _RUNNING.stack
                if stack and stack[-1] is route:
                    stack.pop()

            self._hooks.append(module.register_forward_pre_hook(push))
            self._hooks.append(module.register_forward_hook(pop, always_call=True))
        self._num_layers = len(modules)
        model = dict(model_class=type(transformer).__name__, num_layers=len(modules), transformer_index=tidx)
        accepted = inspect.signature(self.method.check_model).parameters
        if "multi_resolution" in accepted or any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            model["multi_resolution"] = adapter.levels is not None  # (methods written before it existed lack it)
        self.method.check_model(**model)
        # The class's signature: instance-level wrappers (e.g. offload hooks) hide it.
        sig = inspect.signature(type(transformer).forward)
        names = list(sig.parameters)[1:]  # without self

        def read_inputs(mod, args, kwargs, adapter=adapter, names=names, tidx=tidx):
            arguments = dict(zip(names, args))
            arguments.update(kwargs)
            f, h, w = adapter.read_grid(mod, arguments, self._grid_cache)
            hs = arguments.get(adapter.hidden_states_arg)
            self._current_transformer = tidx
            self._forwards_since_step += 1
            if self.step == 0 and self._forwards_since_step == 1 and self._counts_scheduler_steps:
                self._read_pipeline_step_count()
            causal = adapter.frame_causal(mod.config) if adapter.frame_causal is not None else 1
            self._prepare(tidx, f, h, w, str(hs.device), causal)
            if adapter.levels is not None:
                self._prepare_levels(tidx, adapter.levels(mod), h, w, str(hs.device))
            if self._geometry_errors:
                for g in ([self._geometry[tidx]] if adapter.levels is None else
                          [lv[0] for lv in self._levels[tidx].values()]):
                    self._raise_if_refused(g)
            if not (self._counts_scheduler_steps or self._steps_given):
                self._step_from_timestep(arguments.get(adapter.timestep_arg))

        self._hooks.append(transformer.register_forward_pre_hook(read_inputs, with_kwargs=True))

    @torch.compiler.assume_constant_result
    def _prepare(self, tidx: int, frames: int, height: int, width: int, device: str, frame_causal: int = 1) -> bool:
        """Record the token grid and have the method build what it needs for it (with a
        model's frame-causal blocks of ``frame_causal`` > 1 frames, the intersected mask too).

        Runs eagerly even while torch.compile traces the transformer (its result is a
        constant), so masks are built once per geometry outside any graph.
        """
        geometry = AttentionGeometry(frames, height, width)
        self._geometry[tidx] = geometry
        if self._step_totals is None or str(self._step_totals.device) != device:
            self._step_totals = torch.zeros(3, dtype=torch.float32, device=device)  # float64: not on every device
        if self.adapter.levels is None:
            self._prepare_geometry(geometry, device)
            if frame_causal > 1 and self.method.serves_frame_causal and (geometry, device) in self._prepared:
                self.method.call_mask(geometry, torch.device(device), AttentionCall(geometry=geometry,
                                                                                    frame_causal=frame_causal))
        return True

    def _prepare_geometry(self, geometry: AttentionGeometry, device: str) -> None:
        if (geometry, device) in self._prepared or geometry in self._geometry_errors:
            return
        try:
            self.method.check_geometry(geometry)
        except ValueError as e:
            # Refused only if this generation makes a sparse call (a schedule that keeps
            # every call dense serves any geometry); see _raise_if_refused.
            self._geometry_errors[geometry] = e
            return
        self.method.prepare(geometry, torch.device(device))
        self._prepared.add((geometry, device))

    def _makes_sparse_calls(self) -> bool:
        """Whether the schedule lets any call of this generation be sparse (unknown step count: yes)."""
        cfg = self.config
        if all(cfg.layer_is_dense(layer) for layer in range(self._num_layers)):
            return False
        if self.num_steps is None:
            return not self._step_is_dense or self.step is None
        return any(not cfg.step_is_dense(step, self.num_steps) for step in range(self.num_steps))

    def _raise_if_refused(self, geometry: AttentionGeometry) -> None:
        err = self._geometry_errors.get(geometry)
        if err is not None and self._makes_sparse_calls():
            raise err

    def _prepare_levels(self, tidx: int, factors: list[int], height: int, width: int, device: str) -> None:
        """UNets: the token grid of every attention level (downsample factor ``f``: one frame
        of ceil(height / f) x ceil(width / f) tokens), found again by its token count."""
        levels = {}
        for rank, f in enumerate(sorted(factors)):
            g = AttentionGeometry(1, -(-height // f), -(-width // f))
            levels[g.num_tokens] = (g, f, rank)
        if (tidx, height, width) != self._levels_key.get(tidx):
            for g, _, _ in levels.values():
                self._prepare_geometry(g, device)
            self._levels[tidx] = levels
            self._levels_key[tidx] = (tidx, height, width)

    def _patch_scheduler(self) -> None:
        sched = getattr(self._pipeline, "scheduler", None) if self._pipeline is not None else None
        if sched is None or not (hasattr(sched, "set_timesteps") and hasattr(sched, "step")):
            return

        def wrap(name, after):
            original = getattr(sched, name)
            had_instance_attr = name in vars(sched)
            own = vars(sched).get(name)

            def wrapper(receiver, *args, **kwargs):
                # Bound to its scheduler, so a deepcopy of it (SkyReels-V2's diffusion forcing
                # keeps one per frame) calls its own method and still reports the step.
                method = own if own is not None and receiver is sched else getattr(type(receiver), name).__get__(receiver)
                result = method(*args, **kwargs)
                if not self._removed:  # a copy may outlive the handle
                    after()
                return result

            functools.update_wrapper(wrapper, original)
            setattr(sched, name, types.MethodType(wrapper, sched))
            self._scheduler_patches.append((sched, name, original if had_instance_attr else None))

        def new_generation():
            self._check_attached()
            ts = getattr(sched, "timesteps", None)
            self.reset_schedule(len(ts) if ts is not None else None)
            self._advance_to(0)
            self._forwards_since_step = 0

        def next_step():
            # One step per denoising iteration even when several schedulers step after one
            # forward (per-frame schedulers): only a step that follows a forward advances.
            if self.step is not None and self._forwards_since_step:
                self._forwards_since_step = 0
                self._advance_to(self.step + 1)

        wrap("set_timesteps", new_generation)
        wrap("step", next_step)
        self._counts_scheduler_steps = True

    def _check_attached(self) -> None:
        """Warn once if a patched transformer was replaced on the pipeline after apply (the
        new one runs its own attention while this handle would look active)."""
        if self.detached or self._removed or self._pipeline is None:
            return
        for attr, t in self._attributes:
            now = getattr(self._pipeline, attr, None)
            if now is t or getattr(now, "_orig_mod", None) is t:  # torch.compile wraps the patched module
                continue
            self.detached = True
            msg = (f"sparsegen: pipe.{attr} was replaced after sparsegen.apply, so the new {type(now).__name__} runs "
                   f"its own attention and this handle no longer acts on it; call handle.remove() and "
                   f"sparsegen.apply(pipe, ...) again")
            warnings.warn(msg, stacklevel=3)
            logger.warning(msg)
            return

    # ----------------------------------------------------------------- schedule
    def reset_schedule(self, num_steps: Optional[int] = None) -> None:
        """Start a new generation: the next step is step 0.

        Pipelines do this automatically (through their scheduler); call it yourself when
        driving a bare transformer, optionally with the number of steps (for
        ``dense_last_steps``).
        """
        self.step = None
        self._last_timestep = None
        self.num_steps = num_steps
        self._step_is_dense = False
        self._finished_steps = []
        if self._step_totals is not None:
            self._step_totals.zero_()

    def set_step(self, step: int, num_steps: Optional[int] = None) -> None:
        """Set the denoising step of the next transformer calls.

        Pipelines set it through their scheduler. For a bare transformer it is read from
        the timestep (a host read of that value) until you call this; from then on the
        handle follows your calls (call it before each step).
        """
        self._steps_given = True
        self._advance_to(step, num_steps)

    def _read_pipeline_step_count(self) -> None:
        """At a generation's first forward: the denoising loop's length as the pipeline counts
        it (diffusers pipelines set ``_num_timesteps`` before their loop). It differs from the
        scheduler's timesteps when the loop is not one iteration per timestep: SkyReels-V2's
        asynchronous diffusion forcing (``ar_step > 0``), a ``strength`` below 1."""
        n = getattr(self._pipeline, "_num_timesteps", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0 and n != self.num_steps:
            self.num_steps = n
            self._step_is_dense = self.config.step_is_dense(self.step, n)

    def _advance_to(self, step: int, num_steps: Optional[int] = None) -> None:
        self._finish_step()
        if num_steps is not None:
            self.num_steps = num_steps
        self.step = int(step)
        self._step_is_dense = self.config.step_is_dense(self.step, self.num_steps)

    def _step_from_timestep(self, timestep) -> None:
        """Bare transformers: a new distinct timestep is a new step (timesteps decrease)."""
        if timestep is None:
            return
        t = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last_timestep is None or t > self._last_timestep:
            if self._last_timestep is not None:
                self.reset_schedule()
            self._last_timestep = t
            self._advance_to(0)
        elif t != self._last_timestep:
            self._last_timestep = t
            self._advance_to(self.step + 1)

    def _finish_step(self) -> None:
        """Set the step in progress's statistics aside (device copies, no host read)."""
        if self.step is None or self._step_totals is None:
            return
        totals = self._step_totals.clone()
        self._step_totals.zero_()
        self._finished_steps.append({"step": self.step, "density_sum": totals[0], "sparse_calls": totals[1],
                                     "dense_calls": totals[2]})

    def _record(self, density, sparse: bool) -> None:
        """Add one call's density (a float, or a 0-dim device tensor) on the device, in place."""
        totals = self._step_totals
        if totals is None:
            return
        totals[0] += density
        totals[1 if sparse else 2] += 1

    @property
    def step_stats(self) -> list[dict]:
        """Per step, {"step", "density_sum", "sparse_calls", "dense_calls"}: the finished
        steps of the current generation, then the step in progress (values are 0-dim
        device tensors; steps without calls are left out). Reading the counts is a host read."""
        entries = list(self._finished_steps)
        if self.step is not None and self._step_totals is not None:
            t = self._step_totals
            entries.append({"step": self.step, "density_sum": t[0], "sparse_calls": t[1], "dense_calls": t[2]})
        return [e for e in entries if int(e["sparse_calls"]) + int(e["dense_calls"]) > 0]

    def step_densities(self) -> list[tuple[int, float]]:
        """(step, mean attention density over the patched layer calls of that step).

        Reads the device statistics back to the host: call it between or after
        generations, not from inside an attention call.
        """
        return [(s["step"], float(s["density_sum"]) / float(s["sparse_calls"] + s["dense_calls"]))
                for s in self.step_stats]

    # ---------------------------------------------------------------- attention
    def _attend(self, route: _Route, a: dict) -> Optional[torch.Tensor]:
        """The sparse attention of one intercepted call, or None to run the model's own.

        Args:
            a: the call's arguments by name, with ``query``, ``key``, ``value`` laid out
                (B, S, H, D). Returns (B, S, H, D).
        """
        q, k, v = a["query"], a["key"], a["value"]
        cfg = self.config
        cp = getattr(a.get("parallel_config"), "context_parallel_config", None)
        if cfg.layer_is_dense(route.layer) or self._step_is_dense:
            self._record(1.0, sparse=False)
            if cp is not None and (cp.ring_degree or 1) > 1 and self.config.method != "dense":
                # Diffusers' ring attention needs a backend that returns the LSE (the default,
                # native, does not), so a sparse method's dense calls under ring are served here.
                return self._attend_ring_dense(a, cp)
            return None
        if a.get("dropout_p", 0.0) not in (0, 0.0) or a.get("is_causal", False):
            raise ValueError(f"sparsegen: layer '{route.module_name}' asked for dropout or causal attention, "
                             "which sparse self-attention does not serve; keep it dense with dense_layers")
        if a.get("scale") is not None and abs(a["scale"] - q.shape[-1] ** -0.5) > 1e-12:
            raise ValueError(f"sparsegen: layer '{route.module_name}' uses a non-default softmax scale {a['scale']}")
        if cp is not None and ((cp.ring_degree or 1) > 1 or (cp.ulysses_degree or 1) > 1):
            if a.get("attn_mask") is not None:
                raise ValueError(f"sparsegen: layer '{route.module_name}' passed an attention mask under context "
                                 "parallelism, which sparse attention does not serve")
            geometry = self._call_geometry()
            if geometry in self._geometry_errors:
                raise self._geometry_errors[geometry]
            if (cp.ring_degree or 1) > 1:
                return self._attend_ring(route, a, cp, geometry)
            return self._attend_ulysses(route, a, cp, geometry)
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                f"sparsegen: layer '{route.module_name}' is not self-attention ({q.shape[1]} queries, "
                f"{k.shape[1]} keys); the adapter's module pattern is wrong for this model"
            )
        geometry = self._call_geometry()
        downsample, level = 1, 0
        if self.adapter.levels is not None:
            found = self._levels.get(self._current_transformer, {}).get(q.shape[1])
            if found is None:
                raise ValueError(f"sparsegen: layer '{route.module_name}' attends over {q.shape[1]} tokens, which is no "
                                 f"attention level of the latent grid {geometry.grid}")
            geometry, downsample, level = found
        if a.get("enable_gqa", False) or k.shape[2] != q.shape[2]:
            raise ValueError(f"sparsegen: layer '{route.module_name}' uses grouped-query attention ({q.shape[2]} query "
                             f"heads, {k.shape[2]} key heads), which sparse self-attention does not serve")
        text_tokens, text_valid = 0, None
        nv = geometry.num_tokens
        layout = self.adapter.text_layout
        if layout in (TextLayout.SUFFIX, TextLayout.PREFIX):
            text_tokens = q.shape[1] - nv
            if text_tokens < 0:
                raise ValueError(f"sparsegen: {q.shape[1]} tokens is fewer than the video grid's {nv}")
            mask = a.get("attn_mask")
            if mask is not None:
                valid = _key_validity(mask, q.shape[0], q.shape[1])
                text_valid = valid[:, :text_tokens] if layout == TextLayout.PREFIX else valid[:, nv:]
        elif q.shape[1] != nv:
            raise ValueError(
                f"sparsegen: layer '{route.module_name}' attends over {q.shape[1]} tokens but the latent grid "
                f"{geometry.grid} has {nv}; this model variant is not supported by the '{self.adapter.name}' adapter"
            )
        frame_causal = None
        if layout == TextLayout.NONE and a.get("attn_mask") is not None:
            if self.adapter.frame_causal is None:
                raise ValueError(f"sparsegen: layer '{route.module_name}' passed an attention mask to video "
                                 f"self-attention, which the '{self.adapter.name}' adapter does not know; keep these "
                                 f"calls dense with dense_steps / dense_layers, or run without the mask")
            if not self.method.serves_frame_causal:
                raise ValueError(f"sparsegen: '{self.config.method}' cannot combine its mask (chosen per call or per head) with the "
                                 f"frame-causal mask of diffusion forcing ('{route.module_name}'); use radial or gna, "
                                 f"or keep these calls dense with dense_steps / dense_layers")
            # The mask the model passes is the one its config defines (read from the config,
            # not from the device tensor).
            frame_causal = self.adapter.frame_causal(self._transformers[self._current_transformer].config)
        # The step is handed only to methods that read it: a compiled model specializes on
        # what the call reads, and most methods do not depend on the step.
        uses_step = self.method.uses_step
        call = AttentionCall(
            geometry=geometry, layer=route.layer, num_layers=self._num_layers,
            step=self.step if uses_step else None, num_steps=self.num_steps if uses_step else None,
            head_offset=0, total_heads=q.shape[2], backend=cfg.backend, downsample=downsample, level=level,
            frame_causal=frame_causal,
        )
        if self.method.runs_dense(call):
            self._record(1.0, sparse=False)
            return None
        if geometry in self._geometry_errors:
            raise self._geometry_errors[geometry]
        out = sparse_self_attention(self.method, q, k, v, call, text_tokens=text_tokens, text_key_valid=text_valid,
                                    text_first=layout == TextLayout.PREFIX)
        self._record(call.stats.get("density", 1.0), sparse=True)
        return out

    def _call_geometry(self) -> AttentionGeometry:
        geometry = self._geometry.get(self._current_transformer)
        if geometry is None:
            raise RuntimeError("sparsegen: attention ran before the transformer's forward hook read the token grid")
        return geometry

    def _attend_ulysses(self, route: _Route, a: dict, cp, geometry: AttentionGeometry) -> torch.Tensor:
        """Sparse attention under diffusers' Ulysses context parallelism.

        Diffusers' templated Ulysses attention exchanges q, k, v so that each rank holds
        the whole sequence, in the original order, for a contiguous slice of the heads; the
        forward op run there is the method's attention with its head offset (per-head
        masks and orders are sliced at it), and the backward op recomputes it with grad.
        Joint attention's gathered sequence holds each rank's text shard and video shard in
        rank order; a segment map restores ``[text, video]`` (or ``[video, text]``) for the
        method and inverts it on the output.
        """
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        layout = self.adapter.text_layout
        q = a["query"]
        world = cp.ulysses_degree
        if q.shape[2] % world:
            raise ValueError(f"sparsegen: {q.shape[2]} heads do not split over ulysses_degree={world}")
        rank = torch.distributed.get_rank(cp._ulysses_mesh.get_group())
        uses_step = self.method.uses_step
        heads = q.shape[2] // world
        method = self.method
        assignment = contiguous_head_assignment(q.shape[2], world)

        def make_call(indices=None) -> AttentionCall:
            return AttentionCall(
                geometry=geometry, layer=route.layer, num_layers=self._num_layers,
                step=self.step if uses_step else None, num_steps=self.num_steps if uses_step else None,
                head_offset=rank * heads, total_heads=q.shape[2], backend=self.config.backend, head_indices=indices)

        # Heads per rank: per-head work known on the host (static per-head masks) decides it
        # for this call; work known only per call (reports_head_work) is gathered after the
        # call, and the balanced assignment follows this layer's previous call, on the device.
        work = method.head_work(geometry, make_call())
        indices, head_order = None, None  # host head indices of this rank; device (order, inverse)
        if work is not None:
            key = ("assignment", tuple(work), world, self.config.balance_heads, str(q.device))
            if key not in self._head_orders:  # decided (and copied to the device) once per work vector
                chosen = greedy_head_assignment(work, world) if self.config.balance_heads else assignment
                order = [h for hs in chosen for h in hs]
                device_order = None if order == list(range(q.shape[2])) else (
                    torch.tensor(order, device=q.device), torch.argsort(torch.tensor(order)).to(q.device))
                stats = {"ranks": world, "imbalance_contiguous": rank_imbalance(work, assignment),
                         "imbalance": rank_imbalance(work, chosen), "heads_per_rank": chosen}
                self._head_orders[key] = (chosen, device_order, stats)
            chosen, head_order, stats = self._head_orders[key]
            self.parallel_stats[route.layer] = {"transformer": self._current_transformer, **stats}
            if head_order is not None:
                indices = tuple(chosen[rank])
        elif method.reports_head_work and self.config.balance_heads:
            head_order = self._balanced_head_order(route.layer, world)
        permuted = head_order is not None
        if permuted:  # rank r's contiguous slice after the all-to-all holds heads order[r*H/world:]
            for name in ("query", "key", "value"):
                a[name] = a[name].index_select(2, head_order[0])

        calls = []
        nv = geometry.num_tokens
        text_first = layout == TextLayout.PREFIX

        def attend(query, key, value, call):
            """The method over the gathered sequence; joint text is put in its unsharded place first."""
            text = query.shape[1] - nv
            if text < 0 or (text and layout == TextLayout.NONE):
                raise ValueError(f"sparsegen: {query.shape[1]} tokens after the all-to-all, but the latent grid "
                                 f"{geometry.grid} has {nv}")
            if not text:
                return sparse_self_attention(method, query, key, value, call)
            order, inverse = self._joint_order(text, nv, world, text_first, query.device)
            q, k, v = (t.index_select(1, order) for t in (query, key, value))
            out = sparse_self_attention(method, q, k, v, call, text_tokens=text, text_first=text_first)
            return out.index_select(1, inverse)

        def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
            if _save_ctx:
                ctx.save_for_backward(query, key, value)
            call = make_call(indices)
            calls.append(call)
            return attend(query, key, value, call)

        def backward_op(ctx, grad_out, *args, **kwargs):
            query, key, value = (t.detach().requires_grad_() for t in ctx.saved_tensors)
            with torch.enable_grad():
                out = attend(query, key, value, make_call(indices))
                return torch.autograd.grad(out, (query, key, value), grad_out)

        out = _templated_context_parallel_attention(
            a["query"], a["key"], a["value"], None, 0.0, False, a.get("scale"), False, False,
            forward_op=forward_op, backward_op=backward_op, _parallel_config=a["parallel_config"])
        if permuted:
            out = out.index_select(2, head_order[1])
        if calls and "head_blocks" in calls[-1].stats and method.reports_head_work:
            self._gather_head_work(route.layer, calls[-1].stats["head_blocks"], cp, head_order)
        self._record(calls[-1].stats.get("density", 1.0) if calls else 1.0, sparse=True)
        return out

    def _balanced_head_order(self, layer: int, world: int) -> Optional[tuple]:
        """Device (order, inverse) of ``layer``'s heads for this forward, balanced on the work
        its previous call gathered (None before any); the greedy runs for every layer at once
        at a forward's first balanced call (a layer index not above the last one served)."""
        tidx = self._current_transformer
        last, orders = self._balanced_orders.get(tidx, (None, None))
        if orders is None or layer <= last:
            layers = sorted(n for t, n in self._call_work if t == tidx)
            orders = {}
            if layers:
                order = greedy_head_assignment_tensor(
                    torch.stack([self._call_work[(tidx, n)] for n in layers]), world).flatten(1)
                inverse = torch.argsort(order, dim=1)
                orders = {n: (order[i], inverse[i]) for i, n in enumerate(layers)}
        self._balanced_orders[tidx] = (layer, orders)
        return orders.get(layer)

    def _gather_head_work(self, layer: int, local: torch.Tensor, cp, head_order) -> None:
        """Gather the Ulysses ranks' per-head work of a call (device values, no host read)
        into ``parallel_stats[layer]`` and keep it for the next call's balanced assignment.

        Args:
            local: (H / ranks,) this rank's heads' work, in the order the rank held them.
            head_order: None (contiguous slices) or the device (order, inverse) used.
        """
        from torch.distributed import _functional_collectives as funcol

        world = cp.ulysses_degree
        gathered = funcol.all_gather_single(local.detach().float().contiguous(), gather_dim=0,
                                            group=cp._ulysses_mesh.get_group())
        gathered = funcol.wait_tensor(gathered)  # (H,): slot s of the gathered heads held head order[s]
        heads = torch.arange(gathered.numel(), device=gathered.device)
        work = gathered if head_order is None else gathered.index_select(0, head_order[1])
        used = (heads if head_order is None else head_order[0]).view(world, -1)
        self._call_work[(self._current_transformer, layer)] = work
        self.parallel_stats[layer] = {
            "transformer": self._current_transformer, "ranks": world,
            "imbalance_contiguous": rank_imbalance_tensor(work, heads.view(world, -1)),
            "imbalance": rank_imbalance_tensor(work, used), "heads_per_rank": used, "head_work": work}

    def _attend_ring(self, route: _Route, a: dict, cp, geometry: AttentionGeometry) -> torch.Tensor:
        """Sparse attention under diffusers' ring context parallelism.

        Each rank holds a contiguous shard of the queries, keys and values. The keys and
        values are all-gathered (as diffusers' own ring attention does; differentiable: the
        backward reduce-scatters their gradients to their owners), and the rank runs its
        rows of the method's static mask against them: only the query blocks holding its
        tokens, only their visited key blocks, so no key shard a row does not visit is ever
        computed and there is no merge across shards to go wrong.
        """
        method, layout = self.method, self.adapter.text_layout
        if (cp.ulysses_degree or 1) > 1:
            raise ValueError("sparsegen: ring and Ulysses degrees together are not supported; use one of them")
        if not method.has_static_mask:
            raise ValueError(f"sparsegen: '{self.config.method}' cannot run under ring attention (ring_degree > 1): "
                             f"it needs the whole sequence on every call (PARO's per-head token reordering, VMoBA's "
                             f"block selection, agent pooling); use ulysses_degree, or radial / gna")
        if layout != TextLayout.NONE:
            raise ValueError(f"sparsegen: ring attention with joint text attention ({self.adapter.name}) is not "
                             "supported; use ulysses_degree")
        q, k, v = a["query"], a["key"], a["value"]
        world, rank = cp.ring_degree, cp._ring_local_rank
        if q.shape[1] * world != geometry.num_tokens:
            raise ValueError(f"sparsegen: {q.shape[1]} tokens per rank x ring_degree={world} is not the latent "
                             f"grid's {geometry.num_tokens} tokens {geometry.grid}")
        keys, values = self._gather_ring_keys(k, v, cp)
        call = AttentionCall(
            geometry=geometry, layer=route.layer, num_layers=self._num_layers,
            step=self.step if method.uses_step else None, num_steps=self.num_steps if method.uses_step else None,
            head_offset=0, total_heads=q.shape[2], backend=self.config.backend)
        out, _ = method.shard_attention(q, keys, values, call, start=rank * q.shape[1])
        loads = method.shard_work(geometry, world)  # host values from the static mask, cached
        self.parallel_stats[route.layer] = {
            "transformer": self._current_transformer, "ranks": world, "rank_blocks": loads,
            "imbalance": rank_imbalance(loads, [[r] for r in range(world)])}
        self._record(call.stats.get("density", 1.0), sparse=True)
        return out

    @staticmethod
    def _gather_ring_keys(k: torch.Tensor, v: torch.Tensor, cp) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's keys and values (B, S, H, D), differentiable: the backward
        reduce-scatters their gradients to their owners."""
        from torch.distributed import _functional_collectives as funcol

        group = cp._ring_mesh.get_group()
        return (funcol.all_gather_single_autograd(k.contiguous(), gather_dim=1, group=group),
                funcol.all_gather_single_autograd(v.contiguous(), gather_dim=1, group=group))

    def _attend_ring_dense(self, a: dict, cp) -> torch.Tensor:
        """A dense call under ring context parallelism: the rank's queries against every
        rank's keys (PyTorch SDPA, any attention backend)."""
        if a.get("attn_mask") is not None or a.get("is_causal", False) or a.get("dropout_p", 0.0) not in (0, 0.0):
            raise ValueError("sparsegen: a dense call under ring attention passed a mask, causal attention or "
                             "dropout, which it does not serve")
        q = a["query"]
        keys, values = self._gather_ring_keys(a["key"], a["value"], cp)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), scale=a.get("scale"))
        return out.transpose(1, 2)

    def _joint_order(self, text: int, video: int, world: int, text_first: bool, device) -> tuple:
        """(order, inverse) on ``device`` between the gathered sequence of joint attention
        under Ulysses and the unsharded one (:func:`sparsegen.parallel.joint_order`), cached."""
        key = ("joint", text, video, world, text_first, str(device))
        if key not in self._head_orders:
            order = torch.tensor(joint_order([text, video] if text_first else [video, text], world))
            self._head_orders[key] = (order.to(device), torch.argsort(order).to(device))
        return self._head_orders[key]

    # ------------------------------------------------------------------- remove
    def remove(self) -> None:
        """Restore every patched object. Safe to call twice."""
        if self._removed:
            return
        self._removed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for ns, entry in self._entries:
            _Trampolines.release(ns, entry)
        self._entries.clear()
        for sched, name, original in reversed(self._scheduler_patches):
            if original is None:
                delattr(sched, name)
            else:
                setattr(sched, name, original)
        self._scheduler_patches.clear()
        for t in self._transformers:
            if getattr(t, "_sparsegen_handle", None) is self:
                del t._sparsegen_handle
        self._transformers.clear()
        self._prepared.clear()
        self._call_work.clear()
        self._balanced_orders.clear()
        self.method.clear_cache()

    def __enter__(self) -> "SparseHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("detached: a patched transformer was replaced" if self.detached
                                                  else "active")
        return f"SparseHandle({self.config!r}, adapter={getattr(self, 'adapter', None) and self.adapter.name}, {state})"


def _key_validity(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """bool (B, S) key validity from a key-padding attention mask ((B, 1, 1, S) or (B, S))."""
    m = mask
    if m.dtype != torch.bool:
        m = m > -1e4 if m.is_floating_point() else m.bool()
    while m.dim() > 2:
        if m.shape[1] != 1 and m.dim() == 4 and m.shape[2] != 1:
            raise ValueError("sparsegen: only key-padding attention masks ((B, 1, 1, S) or (B, S)) are supported")
        m = m[:, 0]
    return m.expand(batch, seq)


def apply(pipe_or_transformer, method: Union[str, MethodConfig, SparseAttentionMethod, None] = None, *,
          recipe=None, **options) -> SparseHandle:
    """Patch a diffusers pipeline (or a bare transformer) with a sparse-attention method.

    Args:
        pipe_or_transformer: e.g. a ``WanPipeline`` (both transformers of Wan 2.2 are
            patched) or a ``WanTransformer3DModel``.
        method: a method name (``sparsegen.available_methods()``), a config object
            (``sparsegen.RadialConfig(...)``) or a method object (a
            ``SparseAttentionMethod``, e.g. one wrapping another to record its calls).
        recipe: instead of ``method``, the folder of a LoRA trained by ``sparsegen
            train-lora``: its recipe's method config (the schedule the LoRA was trained
            for, with ``options`` overriding single fields), after checking that the model
            is the one it was trained on. Load the LoRA itself with diffusers
            (``pipe.load_lora_weights(folder)``); this sets the attention only.
        **options: the method's config fields when ``method`` is a name (or a recipe).

    Returns:
        A :class:`SparseHandle`; ``handle.remove()`` (or leaving a ``with`` block)
        restores the pipeline exactly.

    Raises:
        ValueError: unsupported model, invalid options, already patched, already compiled,
            a recipe made for another model.

    To compile, apply first, then compile the transformer with static shapes
    (``torch.compile(pipe.transformer, dynamic=False)``): masks are built once per
    geometry outside the graph, and the attention path never reads device values.

    Example::

        handle = sparsegen.apply(pipe, "radial", decay_factor=0.2, dense_steps=12, dense_layers=1)
        video = pipe(prompt, num_frames=81).frames[0]
        handle.remove()
    """
    if recipe is not None:
        if method is not None:
            raise TypeError("pass either a method or recipe=, not both (the recipe names its method)")
        from .lora.recipe import Recipe

        r = Recipe.load(recipe)
        r.check_model(pipe_or_transformer)
        r.warn_if_not_loaded(pipe_or_transformer)
        return SparseHandle(pipe_or_transformer, r.config(**options).make_method())
    if method is None:
        raise TypeError("sparsegen.apply needs a method (a name, config or method object) or recipe=<LoRA folder>")
    if isinstance(method, SparseAttentionMethod):
        if options:
            raise TypeError(f"a method object carries its config; options {sorted(options)} cannot be added to it")
        return SparseHandle(pipe_or_transformer, method)
    return SparseHandle(pipe_or_transformer, make_config(method, **options).make_method())
