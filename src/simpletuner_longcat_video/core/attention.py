"""The one attention seam of the LongCat-Video transformer.

The transformer blocks call :func:`dispatch_attention` (video self-attention) and
:func:`dispatch_cross_attention` (video-to-text) and nothing else; no block knows which kernel
runs. This module owns three decisions:

* the image-to-video split. The first ``num_cond_tokens`` tokens are the clean condition frames:
  their queries see only condition keys, while the noisy queries see every key. The split is done
  here, once, so every backend only ever implements plain (optionally block-sparse) attention.
  Because the condition queries never see a noisy key, their keys and values are the same at every
  denoising step: a sampler may compute them once (``AttentionContext.cached_condition``) and send
  only the noisy queries, which makes exactly the noisy half's backend call;
* which backend runs a call. Backends are :class:`Backend` records in a registry filled by
  :func:`register_backend`: the built-ins ``"sdpa"`` and ``"xformers"``, and lazily the
  ``simpletuner.attention_backends`` entry-point group, whose entries name a :class:`Backend`
  (that is how the block-sparse Triton kernel plugs in). ``"auto"`` takes the first available
  backend that declares itself a candidate for it and can serve the call (device, frame count),
  else SDPA; no backend name is written into the seam;
* what happens when a backend fails. A backend that raises is reported once and replaced by SDPA
  for the rest of the process, because a kernel problem must cost speed, never a training run.

Backend signature, for self-attention::

    backend(q, k, v, *, q_grid, kv_grid, options) -> out

``q`` is ``[B, heads, Sq, D]``, ``k``/``v`` are ``[B, heads, Skv, D]``, ``q_grid``/``kv_grid`` are
the ``(T, H, W)`` token grids of the query and key tokens (``T*H*W == S``; they differ in ``T``
for the noisy half of an image-to-video call), ``options`` is the :class:`AttentionOptions` in
force, and ``out`` has the shape and dtype of ``q``. The softmax scale is ``D ** -0.5``.

A backend that cannot serve one particular call (a grid its tiles do not fit) raises
:class:`BackendDeclined`: that call goes to SDPA and the backend stays in service. Any other
exception retires it. Only the forward call is guarded: an error raised later by an autograd
``backward`` cannot be caught here, so a kernel should compile and check its backward before it
reports itself available.

A backend registered in code under the same name wins over the entry point.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from simpletuner_longcat_video.core.context_parallel import FrameShard

logger = logging.getLogger("simpletuner_longcat_video.core.attention")

ENTRY_POINT_GROUP = "simpletuner.attention_backends"
FALLBACK_BACKEND = "sdpa"

Grid = tuple[int, int, int]


class AttentionBackend(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q_grid: Grid,
        kv_grid: Grid,
        options: AttentionOptions,
    ) -> torch.Tensor: ...


class BackendDeclined(NotImplementedError):
    """Raised by a backend that cannot serve this particular call (a shape it does not tile, say).

    Unlike any other exception it does not retire the backend: only this call goes to SDPA.
    """


@dataclass(frozen=True)
class AttentionOptions:
    """How self-attention should run: the backend, and the block-sparse settings (upstream's defaults).

    The values are checked by the backends that read them (:attr:`Backend.check_options`), through
    :func:`check_options`; the seam only normalises the chunk to a tuple of ints.
    """

    backend: str = "auto"
    sparsity: float = 0.875
    chunk: tuple[int, int, int] = (4, 4, 8)
    cdf_threshold: float | None = None

    def __post_init__(self) -> None:
        # A frozen dataclass still lets us normalise list input (JSON configs give lists).
        object.__setattr__(self, "chunk", tuple(int(c) for c in self.chunk))


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    """A self-attention backend: the function, when it may run, and how it checks its options.

    ``attend`` follows the signature in the module docstring. ``is_available`` is asked once, lazily,
    before the backend is first chosen. ``auto`` makes it a candidate for ``"auto"``; a candidate
    serves only tensors on ``device_types`` (empty: any). Calls whose query or key grid has fewer
    than ``min_frames`` frames go to SDPA (a 3D-chunked kernel has nothing to skip in one frame).
    ``check_options`` raises for options the backend cannot run with.
    """

    name: str
    attend: AttentionBackend
    is_available: Callable[[], bool] = _always
    auto: bool = False
    device_types: tuple[str, ...] = ()
    min_frames: int = 1
    check_options: Callable[[AttentionOptions], None] | None = None


@dataclass(frozen=True)
class AttentionContext:
    """What one transformer forward tells the seam about its tokens.

    ``grid`` is the latent token grid ``(T, H, W)`` after patchify; the sequence is laid out
    frame-major, so the first ``num_cond_tokens`` tokens are whole condition frames. With context
    parallelism ``shard`` says which frames this rank holds: ``grid`` and ``num_cond_tokens`` still
    describe the whole sequence, the ``local_*`` properties this rank's part.

    ``cached_condition`` marks a forward that holds the noisy tokens only: the condition frames'
    keys and values come from a cache (computed once per video) and are prepended to the keys and
    values, so queries are the ``T*H*W - num_cond_tokens`` noisy tokens and keys the whole
    sequence. The ``local_*`` properties then describe the noisy tokens (no condition token is held).
    """

    grid: Grid
    num_cond_tokens: int = 0
    options: AttentionOptions = field(default_factory=AttentionOptions)
    shard: FrameShard | None = None
    cached_condition: bool = False

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def local_frames(self) -> int:
        if self.cached_condition:
            return self.grid[0] - self.num_cond_tokens // (self.grid[1] * self.grid[2])
        return self.grid[0] if self.shard is None else self.shard.local_frames

    @property
    def local_cond_tokens(self) -> int:
        if self.cached_condition:
            return 0
        return self.num_cond_tokens if self.shard is None else self.shard.local_cond_tokens(self.num_cond_tokens)


@dataclass
class _Registered:
    backend: Backend
    available: bool | None = None  # cached answer; availability does not change within a process

    def check_available(self) -> bool:
        if self.available is None:
            try:
                # A probe may run autograd (the block-sparse one runs a backward). Asked inside
                # a checkpointed forward, its saved tensors would go through the checkpoint's
                # hooks in the forward but not in the recomputation (the answer is cached), and
                # torch refuses that backward ("a different number of tensors was saved"). The
                # probe's own tensors get their own, plain hooks.
                with torch.autograd.graph.saved_tensors_hooks(_keep, _keep), torch.enable_grad():
                    self.available = bool(self.backend.is_available())
            except Exception as exc:  # a probe that crashes means "not available", not a crash
                logger.warning(
                    "attention backend %r: is_available() raised %r; treating it as unavailable",
                    self.backend.name,
                    exc,
                )
                self.available = False
        return self.available


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


_LOCK = threading.Lock()
_REGISTRY: dict[str, _Registered] = {}
_FAILED: dict[str, str] = {}
_LOGGED: set[str] = set()
_entry_points_loaded = False


def _log_once(level: int, message: str, *args: Any) -> None:
    key = message % args if args else message
    # No lock: a set add is atomic under the GIL (a rare duplicate line is harmless), and a
    # torch.compile'd block can trace through the seam without a graph break.
    if key in _LOGGED or torch.compiler.is_compiling():
        # Inside a compiled block a log call would split the graph; the same decision is
        # logged by the first eager call (or is visible in compile_blocks' own line).
        return
    _LOGGED.add(key)
    logger.log(level, message, *args)


def register_backend(backend: Backend) -> None:
    """Add or replace a self-attention backend.

    The fallback ``"sdpa"`` cannot be replaced, since it is what failures land on.
    """
    name = backend.name if isinstance(backend, Backend) else None
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend({backend!r}): pass an attention.Backend")
    if not name or name == "auto":
        raise ValueError(f"register_backend(name={name!r}): 'auto' and the empty name are reserved")
    if name == FALLBACK_BACKEND and FALLBACK_BACKEND in _REGISTRY:
        raise ValueError(f"register_backend(name={name!r}): the SDPA fallback cannot be replaced")
    if not callable(backend.attend):
        raise TypeError(f"register_backend(name={name!r}): backend {backend.attend!r} is not callable")
    with _LOCK:
        _REGISTRY[name] = _Registered(backend)
        _FAILED.pop(name, None)


def unregister_backend(name: str) -> None:
    """Remove a backend (tests use this to undo a registration). Removing ``"sdpa"`` is refused."""
    if name == FALLBACK_BACKEND:
        raise ValueError("unregister_backend('sdpa'): the SDPA fallback cannot be removed")
    with _LOCK:
        _REGISTRY.pop(name, None)
        _FAILED.pop(name, None)


def load_entry_point_backends() -> None:
    """Register the backends of the ``simpletuner.attention_backends`` group, once per process.

    Each entry point names a :class:`Backend`. A backend registered in code under the same name
    wins. A failing entry point is logged and skipped: an optional accelerator must never stop the
    model from loading.
    """
    global _entry_points_loaded
    if _entry_points_loaded:  # lock-free fast path (see _log_once)
        return
    with _LOCK:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
    try:
        entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:
        logger.warning("could not list the %r entry points: %r", ENTRY_POINT_GROUP, exc)
        return
    for ep in entry_points:
        if ep.name in _REGISTRY:
            continue
        try:
            backend = ep.load()
            if not isinstance(backend, Backend) or backend.name != ep.name:
                raise TypeError(f"{backend!r} is not an attention.Backend named {ep.name!r}")
            register_backend(backend)
        except Exception as exc:
            logger.warning("skipping attention backend entry point %s = %s: %r", ep.name, ep.value, exc)
            continue
        logger.debug("registered attention backend %r from entry point %s", ep.name, ep.value)


def registered_backends() -> dict[str, bool]:
    """Name -> availability of every known backend (entry points included)."""
    load_entry_point_backends()
    return {name: entry.check_available() and name not in _FAILED for name, entry in sorted(_REGISTRY.items())}


def failed_backends() -> dict[str, str]:
    """Backends retired after a run-time error, with the error; they stay retired for the process."""
    return dict(_FAILED)


def reset_backend_state() -> None:
    """Forget run-time failures, cached availability and the log-once memory (for tests)."""
    with _LOCK:
        _FAILED.clear()
        _LOGGED.clear()
        for entry in _REGISTRY.values():
            entry.available = None


def _require(name: str) -> _Registered:
    if name not in _REGISTRY:
        load_entry_point_backends()
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(
            f"attention backend = {name!r}: no such backend is registered (known: {sorted(_REGISTRY)}). "
            f"Fix: choose one of {['auto', *sorted(_REGISTRY)]}, or install the package that provides it "
            f"through the {ENTRY_POINT_GROUP!r} entry-point group."
        )
    return entry


def check_options(options: AttentionOptions) -> AttentionOptions:
    """``options``, checked by every registered backend that reads them (``auto`` may pick any)."""
    load_entry_point_backends()
    for entry in list(_REGISTRY.values()):
        if entry.backend.check_options is not None:
            entry.backend.check_options(options)
    return options


def _too_few_frames(backend: Backend, q_grid: Grid, kv_grid: Grid) -> bool:
    return min(q_grid[0], kv_grid[0]) < backend.min_frames


def select_backend(options: AttentionOptions, q: torch.Tensor, q_grid: Grid, kv_grid: Grid) -> str:
    """The name of the backend that will serve this call (after retirements)."""
    requested = options.backend
    if requested != "auto":
        entry = _require(requested)
        if requested in _FAILED:
            return FALLBACK_BACKEND
        if _too_few_frames(entry.backend, q_grid, kv_grid):
            # Upstream never runs block sparsity on a single frame (images, the condition frame).
            _log_once(
                logging.INFO,
                "attention backend %r -> 'sdpa' for grids of fewer than %d frames",
                requested,
                entry.backend.min_frames,
            )
            return FALLBACK_BACKEND
        if not entry.check_available():
            hint = " (pip install xformers)" if requested == "xformers" else ""
            raise RuntimeError(
                f"attention backend = {requested!r}: it is registered but not available on this machine{hint}. "
                "Fix: install what it needs, or set the attention backend to 'auto' or 'sdpa'."
            )
        return requested

    load_entry_point_backends()
    choice, reason = FALLBACK_BACKEND, "no backend is a candidate for auto"
    # Sorted by name alone: Dynamo cannot sort (name, entry) pairs, and a compiled block tracing
    # this loop would split its graph here (and a selective checkpoint would not compile at all).
    for name in sorted(_REGISTRY):
        entry = _REGISTRY[name]
        backend = entry.backend
        if not backend.auto:
            continue
        if name in _FAILED:
            reason = f"{name} failed earlier in this process"
        elif not entry.check_available():
            reason = f"{name} reports itself unavailable"
        elif backend.device_types and q.device.type not in backend.device_types:
            reason = f"{name} needs {'/'.join(backend.device_types)} tensors, these are on {q.device.type}"
        elif _too_few_frames(backend, q_grid, kv_grid):
            # Mirrors upstream: single-frame attention (images, the condition frame) stays dense.
            reason = f"grids of fewer than {backend.min_frames} frames stay dense"
        else:
            choice, reason = name, f"registered, available, {q.device.type} tensors, T >= {backend.min_frames}"
            break
    _log_once(logging.INFO, "attention backend 'auto' -> %r: %s", choice, reason)
    return choice


def _run_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_grid: Grid, kv_grid: Grid, options: AttentionOptions
) -> torch.Tensor:
    name = select_backend(options, q, q_grid, kv_grid)
    attend = _REGISTRY[name].backend.attend
    if name == FALLBACK_BACKEND:
        return attend(q, k, v, q_grid=q_grid, kv_grid=kv_grid, options=options)
    try:
        return attend(q, k, v, q_grid=q_grid, kv_grid=kv_grid, options=options)
    except torch.OutOfMemoryError:
        # Running out of memory is the caller's problem; retiring the backend would hide it.
        raise
    except BackendDeclined as exc:
        _log_once(
            logging.INFO,
            "attention backend %r declined q_grid=%s kv_grid=%s (%s); using sdpa for such calls",
            name,
            q_grid,
            kv_grid,
            exc,
        )
    except Exception as exc:
        with _LOCK:
            first = name not in _FAILED
            _FAILED[name] = repr(exc)
        if first:
            logger.warning(
                "attention backend %r raised %r; falling back to sdpa for the rest of this process",
                name,
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
    return _REGISTRY[FALLBACK_BACKEND].backend.attend(q, k, v, q_grid=q_grid, kv_grid=kv_grid, options=options)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects [B, heads, S, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes disagree: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")


def dispatch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext) -> torch.Tensor:
    """Video self-attention with the image-to-video split, through the selected backend.

    ``q``/``k``/``v`` are ``[B, heads, S, D]`` with ``S == T*H*W`` of ``context.grid``. Returns
    ``[B, heads, S, D]``. Under context parallelism they hold this rank's tokens only; an
    all-to-all over heads makes the sequence whole around the backend call.
    """
    _check_qkv(q, k, v)
    shard = context.shard
    if context.cached_condition:
        if shard is not None:
            raise ValueError("a condition KV cache and context parallelism cannot be combined")
        return _dispatch_cached(q, k, v, context)
    if shard is None:
        return _dispatch_whole(q, k, v, context)
    local = shard.token_counts[shard.rank]
    if q.shape[2] != local or k.shape[2] != local:
        raise ValueError(f"attention sequence {q.shape[2]} (keys {k.shape[2]}) is not this rank's {local} tokens")
    q, k, v = shard.seq_to_heads(torch.stack((q, k, v))).unbind(0)
    return shard.heads_to_seq(_dispatch_whole(q, k, v, context))


def _dispatch_whole(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext) -> torch.Tensor:
    t, h, w = context.grid
    seq = q.shape[2]
    if seq != t * h * w or k.shape[2] != seq:
        raise ValueError(f"attention sequence {seq} (keys {k.shape[2]}) does not match the token grid {context.grid}")
    n_cond = context.num_cond_tokens
    frame = h * w
    if n_cond < 0 or n_cond > seq or n_cond % frame:
        raise ValueError(f"num_cond_tokens = {n_cond}: must be whole frames of {frame} tokens within {seq} tokens")
    options = context.options
    if n_cond == 0 or n_cond == seq:
        return _run_backend(q, k, v, context.grid, context.grid, options)

    t_cond = n_cond // frame
    cond_grid = (t_cond, h, w)
    # Condition tokens must not see the noisy frames: their features have to be the same at
    # every denoising step (upstream caches them as a KV prefix for continuation).
    out_cond = _run_backend(q[:, :, :n_cond], k[:, :, :n_cond], v[:, :, :n_cond], cond_grid, cond_grid, options)
    out_noisy = _run_backend(q[:, :, n_cond:], k, v, (t - t_cond, h, w), context.grid, options)
    return torch.cat([out_cond, out_noisy], dim=2)


def _dispatch_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext) -> torch.Tensor:
    # The noisy queries against [cached condition keys ; noisy keys]: the very call the noisy half
    # of _dispatch_whole makes, so every backend (block-sparse included) sees the same grids.
    t, h, w = context.grid
    n_cond = context.num_cond_tokens
    frame = h * w
    if n_cond <= 0 or n_cond % frame or n_cond >= t * frame:
        raise ValueError(f"num_cond_tokens = {n_cond}: a condition cache needs whole frames, fewer than {t}")
    if q.shape[2] != t * frame - n_cond or k.shape[2] != t * frame:
        raise ValueError(
            f"cached-condition attention: {q.shape[2]} queries and {k.shape[2]} keys, expected the "
            f"{t * frame - n_cond} noisy tokens against all {t * frame} of the grid {context.grid}"
        )
    return _run_backend(q, k, v, (t - n_cond // frame, h, w), context.grid, context.options)


def dispatch_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Video-to-text cross-attention; ``kv_mask`` ``[B, L]`` marks valid text tokens (True/nonzero).

    Padded text tokens get exactly zero weight. A sample with no valid token gets a zero output
    instead of the NaN a fully masked softmax row would give. Always SDPA: the key side is at
    most a few hundred tokens, block sparsity has nothing to skip, and SDPA's fused kernels
    accept the mask.
    """
    _check_qkv(q, k, v)
    if kv_mask is None:
        return dense_attention(q, k, v)
    if kv_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"cross-attention mask {tuple(kv_mask.shape)} does not match keys [B, L] = {(k.shape[0], k.shape[2])}"
        )
    mask = kv_mask.to(device=q.device, dtype=torch.bool)
    has_key = mask.any(dim=-1)
    # Rows with nothing to attend to get every key (finite softmax), then their output is zeroed;
    # this avoids a host sync that checking for such rows would need.
    safe = mask | ~has_key[:, None]
    out = dense_attention(q, k, v, attn_mask=safe[:, None, None, :])
    return out * has_key[:, None, None, None].to(out.dtype)


# Built-in backends.

# cuDNN's fused attention first: on the H200 (torch 2.11, cuDNN 9.19, head dim 128) its
# forward+backward is 1.7x faster than flash's at every video shape measured. That build's default
# already picked cuDNN there (benchmarks/gpu_check_dense.py: 139.2 ms default, 140.0 ms with this
# order), but torch's default order lists cuDNN last in other builds (2.13 on a CPU: flash,
# efficient, math, cuDNN); the order pins the faster kernel. A backend a call does not fit (a mask
# cuDNN does not take, a CPU tensor) is skipped, as PyTorch skips its own.
_DENSE_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``scaled_dot_product_attention`` with cuDNN's kernel first where it can serve the call."""
    with sdpa_kernel(_DENSE_PRIORITY, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def sdpa_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_grid: Grid,
    kv_grid: Grid,
    options: AttentionOptions,
) -> torch.Tensor:
    """Dense attention through ``torch.nn.functional.scaled_dot_product_attention`` (:func:`dense_attention`)."""
    return dense_attention(q, k, v)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def xformers_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_grid: Grid,
    kv_grid: Grid,
    options: AttentionOptions,
) -> torch.Tensor:
    """Dense attention through ``xformers.ops.memory_efficient_attention``."""
    try:
        import xformers.ops as xops
    except ImportError as exc:
        raise RuntimeError(
            "attention backend 'xformers' needs the xformers package. Fix: pip install xformers, or use 'sdpa'."
        ) from exc
    # xformers wants [B, S, heads, D].
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


register_backend(Backend(FALLBACK_BACKEND, sdpa_backend))
register_backend(Backend("xformers", xformers_backend, xformers_available))

__all__ = [
    "ENTRY_POINT_GROUP",
    "AttentionBackend",
    "Backend",
    "AttentionContext",
    "AttentionOptions",
    "BackendDeclined",
    "check_options",
    "dispatch_attention",
    "dispatch_cross_attention",
    "failed_backends",
    "load_entry_point_backends",
    "register_backend",
    "registered_backends",
    "reset_backend_state",
    "sdpa_backend",
    "select_backend",
    "unregister_backend",
    "xformers_backend",
]
