"""Block-sparse attention: the real Triton kernels under TRITON_INTERPRET=1 on CPU, at tiny sizes.

Kernel outputs and gradients are compared with a float64 dense reference that uses the same block
mask; selection, pooling and argument checks are tested in plain torch.

Triton must see TRITON_INTERPRET=1 before it is first imported (its own library functions, such
as tl.zeros, are built at import), and another test module may have imported it already. So the
kernel checks run in one fresh interpreter started with the variable set (this file, run as a
script); the tests here assert on what it reports, one test per case.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from simpletuner_longcat_video.kernels.block_sparse import (
    BlockSparseArgumentError,
    block_sparse_attention,
    block_sparse_mask,
    block_sparse_reference,
)
from simpletuner_longcat_video.kernels.selection import ChunkLayout, token_blocks, topk_count

TOLERANCE = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}

# name: (batch, heads, q_grid, kv_grid, chunk, head_dim, dtype, sparsity, cdf_threshold)
CASES = {
    "divisible-fp32": (1, 2, (2, 4, 4), (2, 4, 4), (1, 4, 4), 16, "float32", 0.5, None),
    "partial-every-dim-fp32": (1, 2, (3, 5, 6), (3, 5, 6), (2, 2, 4), 32, "float32", 0.5, None),
    "i2v-kv-longer-bf16": (1, 2, (2, 5, 6), (3, 5, 6), (2, 2, 8), 32, "bfloat16", 0.5, None),
    "batch2-d64-bf16": (2, 2, (1, 6, 6), (2, 6, 6), (1, 4, 4), 64, "bfloat16", 0.75, None),
    "cdf-and-topk-fp16": (1, 2, (3, 5, 6), (3, 5, 6), (2, 2, 4), 64, "float16", 0.6, 0.5),
    "one-block-kept-fp32": (1, 1, (2, 5, 7), (2, 5, 7), (1, 4, 4), 16, "float32", 1.0, None),
    "d128-fp32": (1, 1, (2, 4, 4), (3, 4, 4), (1, 4, 4), 128, "float32", 0.5, None),
    # Chunks of 32/64 rows: the kernels split tiles into 16-row blocks, and on partial grids visit
    # half-chunk tiles, skipping those that hold padding only.
    "divisible-row-splits-bf16": (1, 2, (2, 4, 8), (4, 4, 8), (2, 2, 8), 32, "bfloat16", 0.5, None),
    "partial-half-tiles-fp32": (1, 2, (3, 5, 9), (4, 5, 9), (2, 4, 8), 16, "float32", 0.6, None),
    # Half-chunk tiles with whole key chunks (only the query grid is partial).
    "q-partial-kv-whole-bf16": (1, 2, (3, 4, 8), (4, 4, 8), (2, 2, 8), 32, "bfloat16", 0.5, None),
}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs(batch, heads, q_grid, kv_grid, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape_q = (batch, heads, math.prod(q_grid), head_dim)
    shape_k = (batch, heads, math.prod(kv_grid), head_dim)
    q = torch.randn(shape_q, generator=gen).to(dtype)
    k = torch.randn(shape_k, generator=gen).to(dtype)
    v = torch.randn(shape_k, generator=gen).to(dtype)
    do = torch.randn(shape_q, generator=gen).to(dtype)
    return q, k, v, do


# ---------------------------------------------------------------------------------------------
# Worker side: runs in the fresh interpreter with TRITON_INTERPRET=1.


def _poison_kernel_outputs() -> None:
    """Every tensor the kernels write starts as NaN, so an unwritten element shows up."""
    from simpletuner_longcat_video.kernels import triton_bsa

    assert triton_bsa._INTERPRET, "worker started without TRITON_INTERPRET=1"

    def empty(shape, like, dtype=None):
        return torch.full(shape, float("nan"), device=like.device, dtype=like.dtype if dtype is None else dtype)

    triton_bsa._empty = empty
    triton_bsa._empty_like = lambda t: torch.full_like(t, float("nan"))


def _grad_errors(got, ref) -> dict[str, dict[str, object]]:
    return {
        name: {"rel": _rel(g, r), "finite": bool(torch.isfinite(g).all()), "dtype_ok": g.shape == r.shape}
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)
    }


def _check_case(name: str) -> dict[str, object]:
    batch, heads, q_grid, kv_grid, chunk, head_dim, dtype, sparsity, cdf = CASES[name]
    dtype = getattr(torch, dtype)
    q, k, v, do = _inputs(batch, heads, q_grid, kv_grid, head_dim, dtype)
    kw = dict(q_grid=q_grid, kv_grid=kv_grid, chunk=chunk, sparsity=sparsity, cdf_threshold=cdf)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, **kw)
    out.backward(do)
    got = (out, *[t.grad for t in leaves])
    mask = block_sparse_mask(q, k, **kw)
    ref_leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_reference(*ref_leaves, block_mask=mask, **kw)
    ref.backward(do.double())
    result = _grad_errors(got, (ref, *[t.grad for t in ref_leaves]))
    result["dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in got})
    result["kept_per_row"] = sorted({int(n) for n in mask.sum(-1).flatten()})
    result["num_key_blocks"] = mask.shape[-1]
    return result


def _check_dense() -> dict[str, object]:
    q_grid, kv_grid = (2, 3, 5), (3, 3, 5)
    q, k, v, do = _inputs(1, 2, q_grid, kv_grid, 32, torch.float32, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, q_grid=q_grid, kv_grid=kv_grid, chunk=(1, 2, 8), sparsity=0.0)
    out.backward(do)
    ref_leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves)
    ref.backward(do.double())
    return _grad_errors((out, *[t.grad for t in leaves]), (ref, *[t.grad for t in ref_leaves]))


def _check_strided() -> dict[str, object]:
    # The model hands over q, k, v as views of one packed [B, S, 3, heads, D] projection.
    grid = (2, 3, 6)
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(1, math.prod(grid), 3, 2, 32, generator=gen).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    kw = dict(q_grid=grid, kv_grid=grid, chunk=(1, 2, 8), sparsity=0.5)
    out = block_sparse_attention(q, k, v, **kw)
    out.sum().backward()
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    dense = block_sparse_attention(qc, kc, vc, **kw)
    dense.sum().backward()
    grads = qkv.grad.permute(2, 0, 3, 1, 4).unbind(0)
    return {
        "non_contiguous_input": not q.is_contiguous(),
        "out_equal": bool(torch.equal(out, dense)),
        "grads_equal": all(torch.equal(g, c.grad) for g, c in zip(grads, (qc, kc, vc), strict=True)),
    }


def _worker_main() -> None:
    _poison_kernel_outputs()
    results = {name: _check_case(name) for name in CASES}
    results["dense"] = _check_dense()
    results["strided"] = _check_strided()
    print("BSA-RESULTS " + json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Test side.


def kernel_worker_report(test_file: str, prefix: str, interpret: bool = True) -> dict:
    """Run ``test_file --worker`` in a fresh interpreter, with TRITON_INTERPRET=1 (or, with
    ``interpret=False``, without it, for Triton's real compiler); its last JSON ``prefix`` line."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(Path(test_file).resolve()), "--worker"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        # Not the repo root: its kernels/ folder would shadow the PyPI package of that name.
        cwd=str(Path(__file__).resolve().parent),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(prefix)]
    assert proc.returncode == 0 and lines, f"kernel worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(lines[-1].removeprefix(prefix))


@pytest.fixture(scope="module")
def kernel_results() -> dict[str, dict]:
    return kernel_worker_report(__file__, "BSA-RESULTS ")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernels_match_float64_reference(kernel_results, case):
    result = kernel_results[case]
    *_, dtype, sparsity, cdf = CASES[case]
    assert result["dtypes"] == [dtype]
    assert min(result["kept_per_row"]) >= 1
    if cdf is None:
        assert result["kept_per_row"] == [topk_count(sparsity, result["num_key_blocks"])]
    for name in ("out", "dq", "dk", "dv"):
        assert result[name]["finite"], f"{name} has unwritten (NaN) elements"
        assert result[name]["dtype_ok"], name
        assert result[name]["rel"] <= TOLERANCE[dtype], f"{name}: relative error {result[name]['rel']:.2e}"


def test_sparsity_zero_is_dense_attention(kernel_results):
    for name, result in kernel_results["dense"].items():
        assert result["finite"] and result["rel"] <= 1e-5, (name, result)


def test_strided_qkv_views_match_contiguous(kernel_results):
    assert kernel_results["strided"] == {"non_contiguous_input": True, "out_equal": True, "grads_equal": True}


def _explicit_means(x: torch.Tensor, grid, chunk) -> torch.Tensor:
    blocks = token_blocks(grid, chunk)
    n = int(blocks.max()) + 1
    sums = torch.zeros(*x.shape[:2], n, x.shape[-1], dtype=torch.float64).index_add_(2, blocks, x.double())
    return sums / torch.bincount(blocks, minlength=n).double()[:, None]


def test_pooling_uses_only_real_tokens():
    from simpletuner_longcat_video.kernels.selection import pooled_means

    grid, chunk = (3, 5, 7), (2, 4, 4)
    x = torch.randn(2, 3, math.prod(grid), 16) + 3.0  # offset: zero padding in a mean would show
    got = pooled_means(x, ChunkLayout(grid, chunk))
    assert torch.allclose(got.double(), _explicit_means(x, grid, chunk), atol=1e-5)


def test_token_blocks_follow_raster_chunks():
    grid, chunk = (3, 5, 6), (2, 2, 4)
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    nb = [math.ceil(g / c) for g, c in zip(grid, chunk, strict=True)]
    expected = ((t // 2) * nb[1] + h // 2) * nb[2] + w // 4
    assert torch.equal(token_blocks(grid, chunk), expected.reshape(-1))


@pytest.mark.parametrize(("grid", "chunk"), [((3, 5, 9), (2, 4, 8)), ((2, 6, 8), (1, 4, 4)), ((5, 7, 6), (2, 2, 4))])
def test_tile_tables_cover_each_block_exactly_once(grid, chunk):
    from simpletuner_longcat_video.kernels.selection import choose_tile, tile_geometry

    layout = ChunkLayout(grid, chunk)
    tile = choose_tile(layout, layout)
    geo = tile_geometry(layout, tile, "cpu")
    (_, gh, gw), (ct, ch, cw), (_, nb_h, nb_w) = layout.grid, layout.chunk, layout.blocks
    owner = token_blocks(grid, chunk)
    seen = torch.zeros(layout.num_tokens, dtype=torch.int64)
    listed = [(b, s) for b in range(layout.num_blocks) for s in range(int(geo.tiles_per_block[b]))]
    for block, sub in listed:
        bt, bh, bw = block // (nb_h * nb_w), (block // nb_w) % nb_h, block % nb_w
        cls = 4 * (bt * ct + ct > grid[0]) + 2 * (bh * ch + ch > gh) + (bw * cw + cw > gw)
        rows = torch.arange(sub * tile, (sub + 1) * tile)
        rows = rows[rows < geo.n_real[cls]]
        assert rows.numel() > 0, "a listed tile holds padding only"
        tokens = (bt * ct * gh + bh * ch) * gw + bw * cw + geo.rel[cls, rows].long()
        assert (owner[tokens] == block).all()
        seen[tokens] += 1
    assert (seen == 1).all()


def _explicit_scores(q, k, q_grid, kv_grid, chunk):
    return _explicit_means(q, q_grid, chunk) @ _explicit_means(k, kv_grid, chunk).transpose(-1, -2)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.875, 0.99, 1.0])
def test_topk_selection_keeps_the_highest_scoring_blocks(sparsity):
    q_grid, kv_grid, chunk = (2, 5, 6), (3, 5, 6), (1, 2, 8)
    q, k, _, _ = _inputs(1, 2, q_grid, kv_grid, 16, torch.float32, seed=3)
    mask = block_sparse_mask(q, k, q_grid=q_grid, kv_grid=kv_grid, chunk=chunk, sparsity=sparsity)
    scores = _explicit_scores(q, k, q_grid, kv_grid, chunk)
    n_k = scores.shape[-1]
    n_keep = max(1, math.floor((1 - sparsity) * n_k + 1e-6))
    assert (mask.sum(-1) == n_keep).all()
    # Every kept block scores at least as high as every dropped one.
    kept_min = scores.masked_fill(~mask, math.inf).amin(-1)
    dropped_max = scores.masked_fill(mask, -math.inf).amax(-1)
    assert (kept_min >= dropped_max - 1e-6).all()


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_cdf_threshold_keeps_smallest_set_reaching_the_mass(threshold):
    q_grid, chunk = (2, 4, 8), (1, 2, 8)
    q, k, _, _ = _inputs(1, 2, q_grid, q_grid, 16, torch.float32, seed=4)
    q, k = q * 3, k * 3  # sharper block weights, so the CDF rule is not trivially all-or-one
    scale = 0.25
    mask = block_sparse_mask(
        q, k, q_grid=q_grid, kv_grid=q_grid, chunk=chunk, sparsity=None, cdf_threshold=threshold, scale=scale
    )
    weights = torch.softmax(_explicit_scores(q, k, q_grid, q_grid, chunk) * scale, dim=-1)
    kept_mass = (weights * mask).sum(-1)
    assert (kept_mass >= threshold - 1e-6).all()
    # Minimal: dropping the lightest kept block falls short of the threshold (unless only one is kept).
    lightest = weights.masked_fill(~mask, math.inf).amin(-1)
    counts = mask.sum(-1)
    assert ((kept_mass - lightest < threshold) | (counts == 1)).all()
    # Highest weights first.
    assert (weights.masked_fill(~mask, math.inf).amin(-1) >= weights.masked_fill(mask, -1).amax(-1) - 1e-7).all()
    # Combined with top-k, the larger set wins.
    both = block_sparse_mask(
        q, k, q_grid=q_grid, kv_grid=q_grid, chunk=chunk, sparsity=0.5, cdf_threshold=threshold, scale=scale
    )
    n_top = topk_count(0.5, mask.shape[-1])
    assert (both.sum(-1) == torch.clamp(counts, min=n_top)).all()


def test_every_query_block_keeps_at_least_one_key_block():
    q_grid, kv_grid, chunk = (1, 3, 5), (2, 3, 5), (1, 4, 4)
    q, k, _, _ = _inputs(2, 2, q_grid, kv_grid, 16, torch.float32, seed=5)
    for kw in (dict(sparsity=1.0), dict(sparsity=0.99), dict(sparsity=None, cdf_threshold=1e-9)):
        mask = block_sparse_mask(q, k, q_grid=q_grid, kv_grid=kv_grid, chunk=chunk, **kw)
        assert (mask.sum(-1) >= 1).all(), kw


GOOD = dict(q_grid=(2, 4, 4), kv_grid=(2, 4, 4), chunk=(1, 4, 4))


def _qkv(shape=(1, 2, 32, 16), dtype=torch.float32):
    return tuple(torch.zeros(shape, dtype=dtype) for _ in range(3))


BAD_INPUTS = {
    "q-3d": (lambda: (torch.zeros(2, 32, 16), *_qkv()[1:]), {}, "q", "4-D"),
    "int-dtype": (lambda: _qkv(dtype=torch.int32), {}, "q", "dtype"),
    "float64": (lambda: _qkv(dtype=torch.float64), {}, "q", "dtype"),
    "mixed-dtype": (lambda: (*_qkv()[:2], torch.zeros(1, 2, 32, 16, dtype=torch.float16)), {}, "v", "dtype"),
    "kv-shape": (lambda: (*_qkv()[:2], torch.zeros(1, 2, 16, 16)), {}, "v", "shape of k"),
    "heads": (lambda: (_qkv()[0], *_qkv((1, 3, 32, 16))[1:]), {}, "k", "heads"),
    "head-dim": (lambda: _qkv((1, 2, 32, 24)), {}, "q", "head_dim"),
    "q-grid-count": (lambda: _qkv(), {"q_grid": (2, 4, 5)}, "q_grid", "token count"),
    "kv-grid-count": (lambda: _qkv(), {"kv_grid": (3, 4, 4)}, "kv_grid", "token count"),
    "grid-hw-mismatch": (lambda: _qkv(), {"kv_grid": (2, 2, 8)}, "kv_grid", "H and W"),
    "grid-not-triple": (lambda: _qkv(), {"q_grid": (32,)}, "q_grid", "triple"),
    "chunk-not-pow2": (lambda: _qkv(), {"chunk": (1, 3, 4)}, "chunk", "power of two"),
    "chunk-too-small": (lambda: _qkv(), {"chunk": (1, 2, 4)}, "chunk", "power of two"),
    "sparsity": (lambda: _qkv(), {"sparsity": 1.5}, "sparsity", "[0, 1]"),
    "cdf": (lambda: _qkv(), {"cdf_threshold": 0.0}, "cdf_threshold", "(0, 1]"),
    "scale": (lambda: _qkv(), {"scale": -1.0}, "scale", "positive"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_names_argument_and_rule(case):
    make, overrides, argument, rule = BAD_INPUTS[case]
    with pytest.raises(ValueError) as info:
        block_sparse_attention(*make(), **{**GOOD, **overrides})
    assert isinstance(info.value, BlockSparseArgumentError)
    assert info.value.argument == argument
    message = str(info.value)
    assert f" {argument} = " in message and rule in message and "Fix:" in message


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        block_sparse_attention(*_qkv(), **GOOD)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
