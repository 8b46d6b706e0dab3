"""GPU correctness check of the block-sparse kernels at real LongCat sizes.

Run from the repo root with the package installed::

    python benchmarks/gpu_check_bsa.py            # every check (about a minute on an H100)
    python benchmarks/gpu_check_bsa.py --quick    # the first three checks

The checks mirror tests/test_kernels_block_sparse.py at real sizes: on fresh random inputs, the
kernels' output and dQ, dK, dV against a float32 torch reference (dense masked attention with the
same block mask, computed in row tiles, TF32 off), relative error ||x - ref|| / ||ref||; kernel
outputs are poisoned with NaN before every run so an unwritten element fails. Prints a PASS/FAIL
table, writes JSON to $OUT/gpu_check_bsa.json when OUT is set, and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from simpletuner_longcat_video.kernels import triton_bsa as tk
from simpletuner_longcat_video.kernels.block_sparse import block_sparse_attention, block_sparse_mask
from simpletuner_longcat_video.kernels.selection import token_blocks, topk_count

DEVICE = "cuda"  # a module constant so a CPU dry run under TRITON_INTERPRET=1 can swap it
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def _poison() -> None:
    def empty(shape, like, dtype=None):
        return torch.full(shape, float("nan"), device=like.device, dtype=like.dtype if dtype is None else dtype)

    tk._empty = empty
    tk._empty_like = lambda t: torch.full_like(t, float("nan"))


def reference(q, k, v, do, block_mask, q_grid, kv_grid, chunk, scale, heads=None, rows=2048):
    """Float32 dense masked attention and its gradients, per (batch, head) and query-row tile.

    Returns {(b, h): (out, dq, dk, dv)} for the requested (b, h) pairs (all by default).
    """
    dev = q.device
    q_of = token_blocks(q_grid, chunk, dev)
    k_of = token_blocks(kv_grid, chunk, dev)
    pairs = heads or [(b, h) for b in range(q.shape[0]) for h in range(q.shape[1])]
    results = {}
    for b, h in pairs:
        qf, kf, vf, dof = (t[b, h].float() for t in (q, k, v, do))
        cols = block_mask[b, h][:, k_of]  # [n_q_blocks, Sk]: key tokens allowed per query block
        out = torch.empty_like(qf)
        dq = torch.empty_like(qf)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        for r0 in range(0, qf.shape[0], rows):
            sl = slice(r0, r0 + rows)
            s = (qf[sl] @ kf.T) * scale
            s.masked_fill_(~cols[q_of[sl]], float("-inf"))
            p = torch.softmax(s, dim=-1)
            del s
            o = p @ vf
            out[sl] = o
            dp = dof[sl] @ vf.T
            ds = p * (dp - (dof[sl] * o).sum(-1, keepdim=True))
            del dp
            dq[sl] = (ds @ kf) * scale
            dk += (ds.T @ qf[sl]) * scale
            dv += p.T @ dof[sl]
            del p, ds
        results[(b, h)] = (out, dq, dk, dv)
    return results


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


def check_against_reference(
    name, *, grid_q, grid_kv, heads=2, batch=1, dim=128, dtype=torch.bfloat16, sparsity=0.875, cdf=None,
    chunk=(4, 4, 8), backward=True, ref_heads=None, seed=0,
):  # fmt: skip
    dev = DEVICE
    gen = torch.Generator(device=dev).manual_seed(seed)
    sq, sk = math.prod(grid_q), math.prod(grid_kv)
    q = torch.randn(batch, heads, sq, dim, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(batch, heads, sk, dim, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(batch, heads, sk, dim, device=dev, dtype=dtype, generator=gen)
    do = torch.randn(batch, heads, sq, dim, device=dev, dtype=dtype, generator=gen)
    kw = dict(q_grid=grid_q, kv_grid=grid_kv, chunk=chunk, sparsity=sparsity, cdf_threshold=cdf)
    leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]
    out = block_sparse_attention(*leaves, **kw)
    if backward:
        out.backward(do)
    torch.cuda.synchronize()
    mask = block_sparse_mask(q, k, **kw)
    ref = reference(q, k, v, do, mask, grid_q, grid_kv, chunk, 1.0 / math.sqrt(dim), heads=ref_heads)
    got = {"out": out.detach()}
    if backward:
        got.update(dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
    errors = {}
    for i, key in enumerate(("out", "dq", "dk", "dv")):
        if key not in got:
            continue
        x = torch.stack([got[key][b, h] for b, h in ref])
        r = torch.stack([val[i] for val in ref.values()])
        errors[key] = _rel(x, r)
        errors[key + "_finite"] = bool(torch.isfinite(got[key]).all())
    counts = mask.sum(-1)
    n_top = topk_count(sparsity, mask.shape[-1])
    selection_ok = bool((counts >= 1).all()) and (cdf is not None or bool((counts == n_top).all()))
    tol = TOLERANCE[dtype]
    ok = selection_ok and all(errors[k] <= tol and errors[k + "_finite"] for k in got)
    detail = " ".join(f"{k}={errors[k]:.2e}" for k in got) + f" kept/row={counts.float().mean().item():.1f}"
    return {"name": name, "ok": ok, "detail": detail, "tolerance": tol, "errors": errors}


def check_dense_equals_sdpa(grid=(8, 16, 32), heads=4, dim=128, chunk=(4, 4, 8)):
    dev = DEVICE
    gen = torch.Generator(device=dev).manual_seed(1)
    q, k, v, do = (torch.randn(1, heads, math.prod(grid), dim, device=dev, generator=gen) for _ in range(4))
    leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, q_grid=grid, kv_grid=grid, chunk=chunk, sparsity=0.0)
    out.backward(do.bfloat16())
    ref_leaves = [t.bfloat16().float().requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves)
    ref.backward(do.bfloat16().float())
    errors = {
        name: _rel(x, r)
        for name, x, r in zip(
            ("out", "dq", "dk", "dv"),
            (out, *[t.grad for t in leaves]),
            (ref, *[t.grad for t in ref_leaves]),
            strict=True,
        )
    }
    ok = all(e <= 1e-2 for e in errors.values())
    name = f"sparsity 0 == dense SDPA ({'x'.join(map(str, grid))})"
    return {"name": name, "ok": ok, "detail": str(errors), "errors": errors}


def check_strided_views(grid=(12, 22, 40), heads=4, dim=128, chunk=(4, 4, 8)):
    dev = DEVICE
    gen = torch.Generator(device=dev).manual_seed(2)
    qkv = torch.randn(1, math.prod(grid), 3, heads, dim, device=dev, dtype=torch.bfloat16, generator=gen)
    qkv.requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    kw = dict(q_grid=grid, kv_grid=grid, chunk=chunk, sparsity=0.75)
    do = torch.randn_like(q)
    out = block_sparse_attention(q, k, v, **kw)
    out.backward(do)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    dense = block_sparse_attention(qc, kc, vc, **kw)
    dense.backward(do)
    grads = qkv.grad.permute(2, 0, 3, 1, 4).unbind(0)
    diffs = [(out - dense).abs().max().item()] + [
        (g - c.grad).abs().max().item() for g, c in zip(grads, (qc, kc, vc), strict=True)
    ]
    return {
        "name": f"packed qkv views == contiguous ({'x'.join(map(str, grid))})",
        "ok": max(diffs) == 0.0,
        "detail": f"max|diff|={diffs}",
    }


def check_compiled_equals_eager(grid=(24, 30, 52), heads=8, dim=128) -> dict:
    """torch.compile(fullgraph=True) around the kernels (custom ops): same output and gradients, one graph."""
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    seq = math.prod(grid)
    q, k, v, do = (
        torch.randn(1, heads, seq, dim, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _ in range(4)
    )
    kw = dict(q_grid=grid, kv_grid=grid, chunk=(4, 4, 8), sparsity=0.875)

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, **kw) * 1.0  # an op around it, as in a block

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(do)
        results.append([out.detach()] + [t.grad for t in leaves])
    diffs = [_rel(c.float(), e.float()) for c, e in zip(results[1], results[0], strict=True)]
    torch._dynamo.reset()
    return {
        "name": f"compiled (fullgraph) == eager ({'x'.join(map(str, grid))})",
        "ok": max(diffs) <= 1e-3,
        "detail": "rel err out/dq/dk/dv=" + ", ".join(f"{d:.1e}" for d in diffs),
    }


CHECKS = [
    ("24x44x80 bf16 d128 s=0.875", dict(grid_q=(24, 44, 80), grid_kv=(24, 44, 80))),
    ("24x30x52 bf16 partial h,w", dict(grid_q=(24, 30, 52), grid_kv=(24, 30, 52))),
    ("I2V q 23x30x52 / kv 24x30x52", dict(grid_q=(23, 30, 52), grid_kv=(24, 30, 52))),
    ("24x32x56 bf16 s=0.75", dict(grid_q=(24, 32, 56), grid_kv=(24, 32, 56), sparsity=0.75)),
    ("12x30x52 bf16 d64 4 heads", dict(grid_q=(12, 30, 52), grid_kv=(12, 30, 52), dim=64, heads=4)),
    ("8x16x32 fp16 batch 2", dict(grid_q=(8, 16, 32), grid_kv=(8, 16, 32), dtype=torch.float16, batch=2)),
    ("12x22x40 CDF 0.9 + s=0.5", dict(grid_q=(12, 22, 40), grid_kv=(12, 22, 40), sparsity=0.5, cdf=0.9)),
    ("13x22x40 s=1.0 (one block)", dict(grid_q=(13, 22, 40), grid_kv=(13, 22, 40), sparsity=1.0)),
    (
        "2x32 heads 24x44x80 fwd (b0h0, b1h31)",
        dict(grid_q=(24, 44, 80), grid_kv=(24, 44, 80), batch=2, heads=32, backward=False, ref_heads=[(0, 0), (1, 31)]),
    ),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the first three checks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_check_bsa.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _poison()

    jobs = [(name, lambda kw=kw, name=name: check_against_reference(name, **kw)) for name, kw in CHECKS]
    jobs += [
        ("dense", check_dense_equals_sdpa),
        ("strided", check_strided_views),
        ("compiled", check_compiled_equals_eager),
    ]
    if args.quick:
        jobs = jobs[:3]
    results = []
    for _, job in jobs:
        t0 = time.perf_counter()
        try:
            result = job()
        except Exception as exc:  # a crash is a FAIL of that check, not of the whole table
            result = {"name": _, "ok": False, "detail": f"raised {exc!r}"}
        result["seconds"] = time.perf_counter() - t0
        results.append(result)
        print(f"{'PASS' if result['ok'] else 'FAIL'} {result['name']}: {result['detail']}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()

    print(f"## Block-sparse GPU check, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| check | result | detail | s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {'PASS' if r['ok'] else 'FAIL'} | {r['detail']} | {r['seconds']:.1f} |")
    failed = [r["name"] for r in results if not r["ok"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} passed" + (f"; FAILED: {failed}" if failed else ""))
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu_check_bsa.json"), "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
