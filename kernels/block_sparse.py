"""Block-sparse attention over 3D token grids: public function, autograd glue and a torch reference.

The Triton kernels are imported lazily so that the selection, the mask and the reference work on
machines without Triton, and so tests can set ``TRITON_INTERPRET`` before the kernels are built.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .selection import ChunkLayout, mask_from_lists, select_blocks, token_blocks, topk_count

Grid = tuple[int, int, int]
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, where the kernels put batch * heads


class BlockSparseArgumentError(ValueError):
    """An argument of block_sparse_attention broke a rule; the message names both and the fix."""

    def __init__(self, argument: str, value: object, rule: str, fix: str) -> None:
        self.argument = argument
        self.value = value
        self.rule = rule
        self.fix = fix
        super().__init__(f"block_sparse_attention: {argument} = {value}: {rule}. Fix: {fix}")


def _describe(t: torch.Tensor) -> str:
    return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"


def _as_triple(name: str, value: object) -> Grid:
    if not isinstance(value, Sequence) or len(value) != 3:
        raise BlockSparseArgumentError(name, value, "must be a (t, h, w) triple", f"pass {name}=(T, H, W)")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or item < 1:
            raise BlockSparseArgumentError(name, value, "every entry must be a positive int", f"pass {name}=(T, H, W)")
        out.append(int(item))
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class _Spec:
    q_layout: ChunkLayout
    k_layout: ChunkLayout
    sparsity: float | None
    cdf_threshold: float | None
    scale: float


def check_settings(chunk: object, sparsity: object, cdf_threshold: object) -> Grid:
    """The block-sparse settings' rules, written once: the kernels and the plugin's config check both use them.

    Returns the chunk as a ``(t, h, w)`` triple. ``sparsity`` is the fraction of key blocks each query
    block drops, in [0, 1] (at least one block is always kept, so 1 keeps one); ``cdf_threshold`` keeps the smallest
    set of blocks whose softmax mass reaches it, in (0, 1]; either may be None.
    """
    chunk = _as_triple("chunk", chunk)
    volume = math.prod(chunk)
    if volume < 16 or volume > 256 or volume & (volume - 1):
        raise BlockSparseArgumentError(
            "chunk", chunk, f"t*h*w = {volume} must be a power of two in [16, 256] (a tensor-core tile)",
            "use e.g. (4, 4, 8)",
        )  # fmt: skip
    if sparsity is not None and not (_is_real(sparsity) and 0.0 <= sparsity <= 1.0):
        raise BlockSparseArgumentError(
            "sparsity", sparsity, "must be a number in [0, 1] or None: the fraction of key blocks each query block drops",
            "pass e.g. 0.875 (0.75 keeps twice as many blocks)",
        )  # fmt: skip
    if cdf_threshold is not None and not (_is_real(cdf_threshold) and 0.0 < cdf_threshold <= 1.0):
        raise BlockSparseArgumentError("cdf_threshold", cdf_threshold, "must be in (0, 1] or None", "pass e.g. 0.9")
    return chunk


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_grid: object,
    kv_grid: object,
    chunk: object,
    sparsity: float | None,
    cdf_threshold: float | None,
    scale: float | None,
    *,
    for_kernel: bool,
) -> _Spec:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise BlockSparseArgumentError(name, type(t).__name__, "must be a torch.Tensor", "pass a tensor")
        if t.dim() != 4:
            raise BlockSparseArgumentError(
                name, _describe(t), "must be 4-D [batch, heads, tokens, head_dim]", "reshape to [B, heads, S, D]"
            )
        # The reference and the mask also take float64; the kernels do not.
        if t.dtype not in SUPPORTED_DTYPES and (for_kernel or t.dtype != torch.float64):
            raise BlockSparseArgumentError(
                name, _describe(t), "dtype must be bfloat16, float16 or float32", "cast with .to(torch.bfloat16)"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise BlockSparseArgumentError(name, _describe(t), f"dtype must equal q's {q.dtype}", "cast q, k, v alike")
        if t.device != q.device:
            raise BlockSparseArgumentError(
                name, _describe(t), f"must be on q's device {q.device}", "move them together"
            )
    if k.shape != v.shape:
        raise BlockSparseArgumentError(
            "v", _describe(v), f"must have the shape of k {tuple(k.shape)}", "pass matching k, v"
        )
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        raise BlockSparseArgumentError(
            "k", _describe(k), f"batch and heads must match q {tuple(q.shape[:2])}", "repeat kv heads before calling"
        )
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise BlockSparseArgumentError("k", _describe(k), f"head_dim must match q's {head_dim}", "use one head_dim")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise BlockSparseArgumentError(
            "q", _describe(q), f"head_dim must be one of {SUPPORTED_HEAD_DIMS}", "use a supported head size"
        )

    q_grid = _as_triple("q_grid", q_grid)
    kv_grid = _as_triple("kv_grid", kv_grid)
    if math.prod(q_grid) != q.shape[2]:
        raise BlockSparseArgumentError(
            "q_grid", q_grid, f"T*H*W = {math.prod(q_grid)} must equal q's token count {q.shape[2]}", "pass q's grid"
        )
    if math.prod(kv_grid) != k.shape[2]:
        raise BlockSparseArgumentError(
            "kv_grid", kv_grid, f"T*H*W = {math.prod(kv_grid)} must equal k's token count {k.shape[2]}", "pass k's grid"
        )
    if q_grid[1:] != kv_grid[1:]:
        raise BlockSparseArgumentError(
            "kv_grid", kv_grid, f"H and W must equal q_grid's {q_grid[1:]} (only T may differ)", "pass matching grids"
        )
    chunk = check_settings(chunk, sparsity, cdf_threshold)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not (_is_real(scale) and math.isfinite(scale) and scale > 0):
        raise BlockSparseArgumentError("scale", scale, "must be a finite positive number", "omit it for 1/sqrt(D)")

    if for_kernel:
        if q.device.type != "cuda" and not _interpreting():
            raise BlockSparseArgumentError(
                "q", _describe(q), "the Triton kernels need a CUDA tensor", "move to CUDA, or set TRITON_INTERPRET=1"
            )
        if q.shape[0] * q.shape[1] > MAX_GRID_Y:
            raise BlockSparseArgumentError(
                "q", _describe(q), f"batch * heads must be <= {MAX_GRID_Y}", "split the batch into smaller calls"
            )

    return _Spec(
        q_layout=ChunkLayout(q_grid, chunk),
        k_layout=ChunkLayout(kv_grid, chunk),
        sparsity=None if sparsity is None else float(sparsity),
        cdf_threshold=None if cdf_threshold is None else float(cdf_threshold),
        scale=float(scale),
    )


def _select(q: torch.Tensor, k: torch.Tensor, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    return select_blocks(
        q,
        k,
        spec.q_layout,
        spec.k_layout,
        sparsity=spec.sparsity,
        cdf_threshold=spec.cdf_threshold,
        scale=spec.scale,
    )


# The kernels run through two torch.library custom ops, so torch.compile treats them as opaque
# calls: Dynamo records one op per direction and Inductor never re-compiles the Triton source (it
# did, when Dynamo traced into the launches, and failed on _mma's accumulator), so a compiled
# block keeps one graph with attention in it. The ops take the settings as plain ints and floats,
# which is what a custom op's schema can hold; eager calls run exactly the code they ran before.
OP_NAMESPACE = "longcat_bsa"


def _layouts(q_grid: Sequence[int], kv_grid: Sequence[int], chunk: Sequence[int]) -> tuple[ChunkLayout, ChunkLayout]:
    chunk = tuple(int(c) for c in chunk)
    return ChunkLayout(tuple(int(g) for g in q_grid), chunk), ChunkLayout(tuple(int(g) for g in kv_grid), chunk)


def _list_width(k_layout: ChunkLayout, sparsity: float | None, cdf_threshold: float | None) -> int:
    """Entries per row of select_blocks' lists: top-k keeps a fixed count, the CDF rule a mask's width."""
    if cdf_threshold is not None:
        return k_layout.num_blocks
    return topk_count(sparsity, k_layout.num_blocks)


@torch.library.custom_op(f"{OP_NAMESPACE}::forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_grid: list[int],
    kv_grid: list[int],
    chunk: list[int],
    sparsity: float | None,
    cdf_threshold: float | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection and the Triton forward: (o, lse, kv_list, kv_count); the backward op takes the last three."""
    from . import triton_bsa

    q_layout, k_layout = _layouts(q_grid, kv_grid, chunk)
    spec = _Spec(q_layout, k_layout, sparsity, cdf_threshold, scale)
    plan = triton_bsa.make_plan(q_layout, k_layout, q.device)
    kv_list, kv_count = _select(q, k, spec)
    kv_tiles, kv_tile_count = triton_bsa.key_tile_lists(kv_list, kv_count, plan)
    o, lse = triton_bsa.bsa_forward(q, k, v, kv_tiles, kv_tile_count, plan, scale)
    return o, lse, kv_list, kv_count


@_forward_op.register_fake
def _forward_fake(q, k, v, q_grid, kv_grid, chunk, sparsity, cdf_threshold, scale):
    b, heads, sq, d = q.shape
    q_layout, k_layout = _layouts(q_grid, kv_grid, chunk)
    rows = (b, heads, q_layout.num_blocks)
    # o is stored as [B, Sq, heads, D] and handed out transposed, like bsa_forward's.
    o = q.new_empty((b, sq, heads, d)).transpose(1, 2)
    lse = q.new_empty((b, heads, sq), dtype=torch.float32)
    kv_list = q.new_empty((*rows, _list_width(k_layout, sparsity, cdf_threshold)), dtype=torch.int32)
    kv_count = q.new_empty(rows, dtype=torch.int32)
    return o, lse, kv_list, kv_count


@torch.library.custom_op(f"{OP_NAMESPACE}::backward", mutates_args=())
def _backward_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    kv_list: torch.Tensor,
    kv_count: torch.Tensor,
    q_grid: list[int],
    kv_grid: list[int],
    chunk: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV from the forward's LSE and block lists (the tile lists are rebuilt: cheap, exact)."""
    from . import triton_bsa

    q_layout, k_layout = _layouts(q_grid, kv_grid, chunk)
    plan = triton_bsa.make_plan(q_layout, k_layout, q.device)
    do = do.to(o.dtype)
    delta = triton_bsa.bsa_delta(o, do)
    kv_tiles, kv_tile_count = triton_bsa.key_tile_lists(kv_list, kv_count, plan)
    # The dK/dV kernel walks, per key block, the query tiles of the blocks that selected it.
    q_tiles, q_tile_count = triton_bsa.query_tile_lists(kv_list, kv_count, plan)
    return triton_bsa.bsa_backward(do, q, k, v, lse, delta, kv_tiles, kv_tile_count, q_tiles, q_tile_count, plan, scale)


@_backward_op.register_fake
def _backward_fake(do, q, k, v, o, lse, kv_list, kv_count, q_grid, kv_grid, chunk, scale):
    # bsa_backward allocates with empty_like, whose strides the fake tensors follow too.
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, q_grid, kv_grid, chunk, _sparsity, _cdf, scale = inputs
    o, lse, kv_list, kv_count = output
    ctx.save_for_backward(q, k, v, o, lse, kv_list, kv_count)
    ctx.settings = (list(q_grid), list(kv_grid), list(chunk), scale)
    ctx.mark_non_differentiable(lse, kv_list, kv_count)


def _backward(ctx, do: torch.Tensor, *_unused: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, o, lse, kv_list, kv_count = ctx.saved_tensors
    dq, dk, dv = _backward_op(do, q, k, v, o, lse, kv_list, kv_count, *ctx.settings)
    return dq, dk, dv, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_grid: tuple[int, int, int],
    kv_grid: tuple[int, int, int],
    chunk: tuple[int, int, int] = (4, 4, 8),
    sparsity: float | None = 0.875,
    cdf_threshold: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention of raster-ordered tokens on 3D grids.

    q: [B, heads, Tq*H*W, D]; k, v: [B, heads, Tk*H*W, D]; tokens in raster (t, h, w) order of
    ``q_grid`` / ``kv_grid`` (H and W shared, T may differ). Tokens are grouped into ``chunk``
    (t, h, w) blocks (partial at the grid's far edges); each query block attends to the key blocks
    whose mean-pooled key scores highest against its mean-pooled query: the top
    ``floor((1 - sparsity) * n_key_blocks)`` (at least one), widened to reach ``cdf_threshold`` of the
    softmax mass when that is given (``sparsity=None`` or ``1.0`` leaves the CDF rule alone).
    Returns [B, heads, Tq*H*W, D] in q's dtype, raster order, stored as [B, Tq*H*W, heads, D] (a
    transposed view, so ``out.transpose(1, 2).reshape(B, S, heads * D)`` costs no copy). Inputs may
    have any strides (e.g. views of a packed qkv projection); nothing is copied around the kernels.
    Differentiable in q, k, v; the block selection is not.
    """
    spec = _validate(q, k, v, q_grid, kv_grid, chunk, sparsity, cdf_threshold, scale, for_kernel=True)
    o, *_ = _forward_op(
        q, k, v, [*spec.q_layout.grid], [*spec.k_layout.grid], [*spec.q_layout.chunk],
        spec.sparsity, spec.cdf_threshold, spec.scale,
    )  # fmt: skip
    return o


def block_sparse_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_grid: tuple[int, int, int],
    kv_grid: tuple[int, int, int],
    chunk: tuple[int, int, int] = (4, 4, 8),
    sparsity: float | None = 0.875,
    cdf_threshold: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The block selection block_sparse_attention makes: bool [B, heads, n_q_blocks, n_k_blocks].

    Blocks are numbered in raster order of the chunk grid; ``token_blocks`` maps tokens to them.
    """
    spec = _validate(q, k, k, q_grid, kv_grid, chunk, sparsity, cdf_threshold, scale, for_kernel=False)
    lists, counts = _select(q, k, spec)
    return mask_from_lists(lists, counts, spec.k_layout.num_blocks)


def block_sparse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_grid: tuple[int, int, int],
    kv_grid: tuple[int, int, int],
    chunk: tuple[int, int, int] = (4, 4, 8),
    sparsity: float | None = 0.875,
    cdf_threshold: float | None = None,
    scale: float | None = None,
    block_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dense masked attention in ``compute_dtype`` with the same block selection (or ``block_mask``).

    Materialises [B, heads, Sq, Sk]: for tests at small sizes. Differentiable in q, k, v; returns
    ``compute_dtype``.
    """
    spec = _validate(q, k, v, q_grid, kv_grid, chunk, sparsity, cdf_threshold, scale, for_kernel=False)
    if block_mask is None:
        block_mask = block_sparse_mask(
            q,
            k,
            q_grid=q_grid,
            kv_grid=kv_grid,
            chunk=chunk,
            sparsity=sparsity,
            cdf_threshold=cdf_threshold,
            scale=scale,
        )
    q_of = token_blocks(spec.q_layout.grid, spec.q_layout.chunk, q.device)
    k_of = token_blocks(spec.k_layout.grid, spec.k_layout.chunk, q.device)
    block_mask = block_mask.to(q.device)
    allowed = block_mask[:, :, q_of][:, :, :, k_of]
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) * spec.scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.to(compute_dtype)
