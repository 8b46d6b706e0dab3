"""The block-sparse Triton kernel as an attention backend for the seam in ``attention.py``.

Published through the ``simpletuner.attention_backends`` entry-point group as
``block_sparse = simpletuner_longcat_video.core.attention_bsa:BACKEND``, an ``attention.Backend``
that is a candidate for ``"auto"`` on CUDA tensors with more than one frame. Importing this module
is cheap: Triton is imported, and a kernel compiled, only by :func:`is_available` and by the first call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from simpletuner_longcat_video.core.attention import AttentionOptions, Backend, BackendDeclined
from simpletuner_longcat_video.kernels.block_sparse import (
    BlockSparseArgumentError,
    block_sparse_attention,
    check_settings,
)


class Availability(NamedTuple):
    """``(ok, reason)``; also truthy exactly when ``ok``, so ``bool(is_available())`` is meaningful."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def block_sparse_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_grid: tuple[int, int, int],
    kv_grid: tuple[int, int, int],
    options: AttentionOptions,
) -> torch.Tensor:
    """Block-sparse self-attention; raises the seam's ``BackendDeclined`` for shapes it cannot tile.

    The output is ``[B, heads, Sq, D]`` stored as ``[B, Sq, heads, D]`` (a transposed view), so the
    usual ``out.transpose(1, 2).reshape(B, Sq, heads * D)`` afterwards is free.
    """
    try:
        return block_sparse_attention(
            q,
            k,
            v,
            q_grid=tuple(q_grid),
            kv_grid=tuple(kv_grid),
            chunk=tuple(options.chunk),
            sparsity=options.sparsity,
            cdf_threshold=options.cdf_threshold,
        )
    except BlockSparseArgumentError as exc:
        # A head size, dtype or chunk the kernels do not take is a property of this call, not a
        # broken kernel: decline it (it goes to SDPA) and stay in service for other calls.
        raise BackendDeclined(str(exc)) from exc


def prerequisites() -> Availability:
    """The cheap half of :func:`is_available`: a CUDA device and an importable Triton (nothing compiled).

    Checked when the config is read (``attention_implementation: block_sparse``), before any weight loads.
    """
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device (the block-sparse kernels are Triton GPU kernels)")
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return Availability(False, f"triton is not importable: {exc!r}")
    return Availability(True, "CUDA and Triton present")


@functools.cache
def is_available() -> Availability:
    """Whether the kernels run here: CUDA present, Triton importable, and a tiny forward *and*
    backward compile, run and agree with dense attention (the seam can only catch forward errors)."""
    found = prerequisites()
    if not found:
        return found
    try:
        grid = (2, 4, 4)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, 2, 32, 64, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(3)
        )
        out = block_sparse_attention(q, k, v, q_grid=grid, kv_grid=grid, chunk=(1, 4, 4), sparsity=0.0)
        out.float().sum().backward()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.detach().float(), k.detach().float(), v.detach().float()
        )
        error = ((out.float() - ref).norm() / ref.norm()).item()
        grads_finite = all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
        torch.cuda.synchronize()
    except Exception as exc:
        return Availability(False, f"the block-sparse kernels failed to compile or run: {exc!r}")
    if not (error < 2e-2 and grads_finite):
        return Availability(False, f"the block-sparse smoke test disagreed with SDPA (rel. error {error:.3g})")
    return Availability(True, "CUDA, Triton, and a compiled forward and backward")


def check_options(options: AttentionOptions) -> None:
    """The seam's options against the kernels' rules (``kernels.block_sparse.check_settings``)."""
    check_settings(options.chunk, options.sparsity, options.cdf_threshold)


BACKEND = Backend(
    name="block_sparse",
    attend=block_sparse_backend,
    is_available=is_available,
    auto=True,
    device_types=("cuda",),
    min_frames=2,
    check_options=check_options,
)
