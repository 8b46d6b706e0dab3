"""Triton kernels for block-sparse attention over 3D token grids.

Tensors stay in raster order (t, h, w) with whatever strides the caller has; a kernel turns "row r
of chunk c" into a token index (``_tile_rows``), so nothing is regrouped or copied around the
kernels. Rows of a chunk are numbered real cells first; on grids with partial edge chunks a small
table maps rows to tokens. Each program owns (a row block of) one chunk; its inner loop walks a
compact list of ``TILE``-row tiles of the other side, where ``TILE`` is the chunk or half of it
and tiles holding padding only are left out of the lists, so half-empty edge chunks cost half.
Padding rows inside a visited tile are loaded as zero and masked: keys out of the softmax, queries
out of every store. Zero q and dO (and LSE = delta = 0) on those rows also make them contribute
exactly nothing to dK/dV.

Which key tiles a query chunk attends to is a list per query chunk (``KV_LIST`` with ``KV_COUNT``
valid entries: the tiles of its selected key chunks); the dK/dV kernel gets the transposed lists
(for every key chunk, the query tiles of the chunks that selected it), so every gradient is
accumulated in registers without atomics.

Softmax runs in base 2: scores are multiplied by ``scale * log2(e)``, and the saved LSE is in log2
units, which the backward reuses as is.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .selection import (
    ChunkLayout,
    TileGeometry,
    choose_tile,
    expand_to_tiles,
    lists_from_mask,
    mask_from_lists,
    tile_geometry,
)

LOG2E = 1.4426950408889634

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# LONGCAT_BSA_AUTOTUNE=0 pins each kernel to its first valid config: no benchmarking on first call.
_AUTOTUNE = os.environ.get("LONGCAT_BSA_AUTOTUNE", "1") != "0"
_AUTOTUNE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Explicit candidates, best guess first. A program owns a whole chunk (``CHUNK`` rows) cut into
# ``*_SPLIT`` row blocks (one per program); its inner loop walks list tiles of ``TILE`` rows, in
# steps of ``TILE // N_SPLIT`` (forward) or ``BLOCK_M``/``BLOCK_N`` rows (backward). Configs with
# num_stages=1 are only the interpreter's picks (the most split tiling a tiny chunk allows, so CPU
# tests walk the sub-block paths); GPU tuning never sees them.
FWD_CONFIGS = [
    _cfg(8, 3, M_SPLIT=1, N_SPLIT=1),
    _cfg(8, 2, M_SPLIT=1, N_SPLIT=1),
    _cfg(8, 3, M_SPLIT=1, N_SPLIT=2),
    _cfg(4, 3, M_SPLIT=2, N_SPLIT=1),
    _cfg(4, 3, M_SPLIT=2, N_SPLIT=2),
    _cfg(4, 1, M_SPLIT=2, N_SPLIT=2),
    _cfg(4, 1, M_SPLIT=2, N_SPLIT=1),
    _cfg(4, 1, M_SPLIT=1, N_SPLIT=1),
]
DKDV_CONFIGS = [
    _cfg(8, 2, N_SPLIT=1, BLOCK_M=64),
    _cfg(8, 3, N_SPLIT=1, BLOCK_M=64),
    _cfg(8, 3, N_SPLIT=1, BLOCK_M=32),
    _cfg(4, 3, N_SPLIT=2, BLOCK_M=32),
    _cfg(4, 1, N_SPLIT=2, BLOCK_M=16),
    _cfg(4, 1, N_SPLIT=1, BLOCK_M=16),
]
DQ_CONFIGS = [
    _cfg(8, 2, M_SPLIT=1, BLOCK_N=64),
    _cfg(8, 3, M_SPLIT=1, BLOCK_N=64),
    _cfg(8, 3, M_SPLIT=1, BLOCK_N=32),
    _cfg(4, 2, M_SPLIT=2, BLOCK_N=64),
    _cfg(4, 3, M_SPLIT=2, BLOCK_N=32),
    _cfg(4, 1, M_SPLIT=2, BLOCK_N=16),
    _cfg(4, 1, M_SPLIT=1, BLOCK_N=16),
]


def _config_valid(config: triton.Config, chunk: int, tile: int, program_split: str) -> bool:
    """Row blocks must be tensor-core sized (>= 16 rows) and divide what they cut (the chunk for the
    program's own split, the list tile otherwise); and a program may own at most 16 rows per warp:
    above that, ptxas -v shows sm_90 builds spilling registers. (The GPU configs above were checked
    with ptxas -v for chunk 128, head dim 128, bf16: no spills, except up to 36 bytes in the two
    BLOCK_M=64 dK/dV configs on grids with partial chunks.)"""
    for name, value in config.kwargs.items():
        whole = chunk if name == program_split else tile
        rows = whole // value if name.endswith("SPLIT") else value
        if rows < 16 or rows > whole or whole % rows:
            return False
    return chunk // config.kwargs[program_split] <= 16 * config.num_warps


def _pick(configs: list[triton.Config], chunk: int, tile: int, program_split: str) -> triton.Config:
    valid = [c for c in configs if _config_valid(c, chunk, tile, program_split)]
    if _INTERPRET:
        return next(c for c in valid if c.num_stages == 1)
    return next((c for c in valid if c.num_stages > 1), valid[0])


def _sizes(args: dict) -> tuple[int, int]:
    return int(args["CT"]) * int(args["CH"]) * int(args["CW"]), int(args["TILE"])


def _pruner(program_split: str):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
        chunk, tile = _sizes({**named_args, **kwargs})
        valid = [c for c in configs if c.num_stages > 1 and _config_valid(c, chunk, tile, program_split)]
        return valid or [_pick(configs, chunk, tile, program_split)]

    return prune


@triton.jit
def _mma(a, b, acc=None, DOT_PREC: tl.constexpr = "tf32", UPCAST: tl.constexpr = False):
    # Triton's CPU interpreter multiplies bfloat16 tiles as their raw uint16 bits; UPCAST (set only
    # under the interpreter) hands it float32 copies, which is exact: bf16 products fit in fp32.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _tile_rows(
    tile, row0, t_len, H, W, nb_h, nb_w, REL,
    ROWS: tl.constexpr, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, TILE: tl.constexpr,
    PARTIAL: tl.constexpr,
):  # fmt: skip
    """Rows ``row0 .. row0 + ROWS - 1`` of ``tile`` (of TILE rows; TILE == chunk: tile == chunk):
    (token index, row is real, some row is padding)."""
    CHUNK: tl.constexpr = CT * CH * CW
    TPB: tl.constexpr = CHUNK // TILE
    block = tile // TPB
    r = (tile % TPB) * TILE + row0 + tl.arange(0, ROWS)
    bt = block // (nb_h * nb_w)
    bh = (block // nb_w) % nb_h
    bw = block % nb_w
    origin = (bt * CT * H + bh * CH) * W + bw * CW
    if PARTIAL:
        # Real-first numbering depends on the block's extents, one of 8 classes; their row offsets
        # are a 8 x CHUNK table held in registers (a table load per step would sit in the address
        # chain of the K/V prefetch and shorten the pipeline).
        cls = (bt * CT + CT > t_len).to(tl.int32) * 4 + (bh * CH + CH > H).to(tl.int32) * 2
        cls += (bw * CW + CW > W).to(tl.int32)
        n_real = tl.minimum(t_len - bt * CT, CT) * tl.minimum(H - bh * CH, CH) * tl.minimum(W - bw * CW, CW)
        tok = origin + tl.gather(tl.load(REL + tl.arange(0, 8 * CHUNK)), cls * CHUNK + r, 0)
        valid = r < n_real
        padded = (tile % TPB) * TILE + row0 + ROWS > n_real
    else:
        tok = origin + ((r // (CH * CW)) * H + (r // CW) % CH) * W + r % CW
        valid = r < CHUNK
        padded = block < 0
    return tok, valid, padded


@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, Out, LSE, KV_LIST, KV_COUNT, REL_Q, REL_K,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    n_heads, qk_scale,
    t_q, t_k, H, W, nb_h, nb_w, n_q_blocks, list_width,
    CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    Q_PARTIAL: tl.constexpr, K_PARTIAL: tl.constexpr, OFF64: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    M_SPLIT: tl.constexpr, N_SPLIT: tl.constexpr,
):  # fmt: skip
    CHUNK: tl.constexpr = CT * CH * CW
    BLOCK_M: tl.constexpr = CHUNK // M_SPLIT
    BLOCK_N: tl.constexpr = TILE // N_SPLIT
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    q_block = pid_m // M_SPLIT

    offs_d = tl.arange(0, HEAD_DIM)
    tok_m, valid_m, _ = _tile_rows(
        q_block, (pid_m % M_SPLIT) * BLOCK_M, t_q, H, W, nb_h, nb_w, REL_Q, BLOCK_M, CT, CH, CW, CHUNK, Q_PARTIAL
    )
    if OFF64:
        tok_m = tok_m.to(tl.int64)
    q_ptrs = Q + b * stride_qb + h * stride_qh + tok_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    if Q_PARTIAL:
        q = tl.load(q_ptrs, mask=valid_m[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    list_row = KV_LIST + (bh * n_q_blocks + q_block) * list_width
    steps = tl.load(KV_COUNT + bh * n_q_blocks + q_block) * N_SPLIT
    if Q_PARTIAL:
        # A row block of an edge chunk may hold padding only: it has nothing to compute or store.
        steps = tl.where(tl.max(valid_m.to(tl.int32), 0) > 0, steps, 0)
    # The next list entry is carried in a register, a step ahead: the pipeliner then sees K/V
    # addresses that do not wait on a load of the same step and prefetches them two steps ahead
    # (loading the entry in-step left one step of distance and exposed the K/V latency).
    next_kt = tl.load(list_row)
    for j in range(0, steps):
        kt = next_kt
        next_kt = tl.load(list_row + (j + 1) // N_SPLIT, mask=j + 1 < steps, other=0)
        tok_n, valid_n, padded_n = _tile_rows(
            kt, (j % N_SPLIT) * BLOCK_N, t_k, H, W, nb_h, nb_w, REL_K, BLOCK_N, CT, CH, CW, TILE, K_PARTIAL
        )
        if OFF64:
            tok_n = tok_n.to(tl.int64)
        k_ptrs = k_base + tok_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
        v_ptrs = v_base + tok_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
        if K_PARTIAL:
            k = tl.load(k_ptrs, mask=valid_n[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = _mma(q, tl.trans(k), DOT_PREC=DOT_PREC, UPCAST=UPCAST)
        if K_PARTIAL:
            if padded_n:
                s = tl.where(valid_n[None, :], s, float("-inf"))
        # Listed tiles start with a real row, so the first step of every row sees a finite maximum
        # and m_i is finite from then on: no (-inf) - (-inf) below.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if K_PARTIAL:
            v = tl.load(v_ptrs, mask=valid_n[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PREC=DOT_PREC, UPCAST=UPCAST)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + tok_m[:, None] * stride_os + offs_d[None, :] * stride_od
    lse_ptrs = LSE + bh * (t_q * H * W) + tok_m
    if Q_PARTIAL:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=valid_m[:, None])
        tl.store(lse_ptrs, m_i + tl.math.log2(l_i), mask=valid_m)
    else:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty))
        tl.store(lse_ptrs, m_i + tl.math.log2(l_i))


@triton.jit
def _bsa_delta_kernel(
    Out, DO, DELTA,
    seq, n_heads,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_db, stride_dh, stride_ds, stride_dd,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # delta_i = sum_d dO_id * O_id per raster token, read straight from the (possibly strided) tensors.
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    offs_s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (offs_s < seq)[:, None]
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :] * stride_od,
        mask=rows,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_s[:, None] * stride_ds + offs_d[None, :] * stride_dd,
        mask=rows,
        other=0.0,
    )
    tl.store(DELTA + bh * seq + offs_s, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_s < seq)


@triton.jit
def _bsa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_LIST, Q_COUNT, REL_Q, REL_K,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    n_heads, qk_scale, sm_scale,
    t_q, t_k, H, W, nb_h, nb_w, n_k_blocks, list_width,
    CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    Q_PARTIAL: tl.constexpr, K_PARTIAL: tl.constexpr, OFF64: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    N_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # One program owns a row block of a key chunk and walks the query tiles whose block selected
    # that chunk. Padding key rows get garbage dK/dV that is never stored; padding query rows load
    # q = dO = 0 and LSE = delta = 0, so they add exactly zero.
    CHUNK: tl.constexpr = CT * CH * CW
    BLOCK_N: tl.constexpr = CHUNK // N_SPLIT
    SUB: tl.constexpr = TILE // BLOCK_M
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    k_block = pid_n // N_SPLIT

    offs_d = tl.arange(0, HEAD_DIM)
    tok_n, valid_n, _ = _tile_rows(
        k_block, (pid_n % N_SPLIT) * BLOCK_N, t_k, H, W, nb_h, nb_w, REL_K, BLOCK_N, CT, CH, CW, CHUNK, K_PARTIAL
    )
    if OFF64:
        tok_n = tok_n.to(tl.int64)
    k_ptrs = K + b * stride_kb + h * stride_kh + tok_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + tok_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    if K_PARTIAL:
        k = tl.load(k_ptrs, mask=valid_n[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid_n[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_db + h * stride_dh
    stats_base = bh * (t_q * H * W)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    list_row = Q_LIST + (bh * n_k_blocks + k_block) * list_width
    steps = tl.load(Q_COUNT + bh * n_k_blocks + k_block) * SUB
    if K_PARTIAL:
        steps = tl.where(tl.max(valid_n.to(tl.int32), 0) > 0, steps, 0)
    next_qt = tl.load(list_row)
    for j in range(0, steps):
        qt = next_qt
        next_qt = tl.load(list_row + (j + 1) // SUB, mask=j + 1 < steps, other=0)
        tok_m, valid_m, _ = _tile_rows(
            qt, (j % SUB) * BLOCK_M, t_q, H, W, nb_h, nb_w, REL_Q, BLOCK_M, CT, CH, CW, TILE, Q_PARTIAL
        )
        if OFF64:
            tok_m = tok_m.to(tl.int64)
        q_ptrs = q_base + tok_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
        do_ptrs = do_base + tok_m[:, None] * stride_ds + offs_d[None, :] * stride_dd
        if Q_PARTIAL:
            q = tl.load(q_ptrs, mask=valid_m[:, None], other=0.0)
            lse = tl.load(LSE + stats_base + tok_m, mask=valid_m, other=0.0)
            do = tl.load(do_ptrs, mask=valid_m[:, None], other=0.0)
            delta = tl.load(DELTA + stats_base + tok_m, mask=valid_m, other=0.0)
        else:
            q = tl.load(q_ptrs)
            lse = tl.load(LSE + stats_base + tok_m)
            do = tl.load(do_ptrs)
            delta = tl.load(DELTA + stats_base + tok_m)
        p_t = tl.math.exp2(_mma(k, tl.trans(q), DOT_PREC=DOT_PREC, UPCAST=UPCAST) * qk_scale - lse[None, :])
        dv = _mma(p_t.to(do.dtype), do, dv, DOT_PREC=DOT_PREC, UPCAST=UPCAST)
        dp_t = _mma(v, tl.trans(do), DOT_PREC=DOT_PREC, UPCAST=UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(ds_t.to(q.dtype), q, dk, DOT_PREC=DOT_PREC, UPCAST=UPCAST)

    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + tok_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + tok_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    if K_PARTIAL:
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=valid_n[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=valid_n[:, None])
    else:
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))


@triton.jit
def _bsa_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_LIST, KV_COUNT, REL_Q, REL_K,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    n_heads, qk_scale, sm_scale,
    t_q, t_k, H, W, nb_h, nb_w, n_q_blocks, list_width,
    CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    Q_PARTIAL: tl.constexpr, K_PARTIAL: tl.constexpr, OFF64: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    M_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    CHUNK: tl.constexpr = CT * CH * CW
    BLOCK_M: tl.constexpr = CHUNK // M_SPLIT
    SUB: tl.constexpr = TILE // BLOCK_N
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    q_block = pid_m // M_SPLIT

    offs_d = tl.arange(0, HEAD_DIM)
    tok_m, valid_m, _ = _tile_rows(
        q_block, (pid_m % M_SPLIT) * BLOCK_M, t_q, H, W, nb_h, nb_w, REL_Q, BLOCK_M, CT, CH, CW, CHUNK, Q_PARTIAL
    )
    if OFF64:
        tok_m = tok_m.to(tl.int64)
    q_ptrs = Q + b * stride_qb + h * stride_qh + tok_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_db + h * stride_dh + tok_m[:, None] * stride_ds + offs_d[None, :] * stride_dd
    stats_base = bh * (t_q * H * W)
    if Q_PARTIAL:
        q = tl.load(q_ptrs, mask=valid_m[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=valid_m[:, None], other=0.0)
        lse = tl.load(LSE + stats_base + tok_m, mask=valid_m, other=0.0)
        delta = tl.load(DELTA + stats_base + tok_m, mask=valid_m, other=0.0)
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(LSE + stats_base + tok_m)
        delta = tl.load(DELTA + stats_base + tok_m)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    list_row = KV_LIST + (bh * n_q_blocks + q_block) * list_width
    steps = tl.load(KV_COUNT + bh * n_q_blocks + q_block) * SUB
    if Q_PARTIAL:
        steps = tl.where(tl.max(valid_m.to(tl.int32), 0) > 0, steps, 0)
    next_kt = tl.load(list_row)
    for j in range(0, steps):
        kt = next_kt
        next_kt = tl.load(list_row + (j + 1) // SUB, mask=j + 1 < steps, other=0)
        tok_n, valid_n, padded_n = _tile_rows(
            kt, (j % SUB) * BLOCK_N, t_k, H, W, nb_h, nb_w, REL_K, BLOCK_N, CT, CH, CW, TILE, K_PARTIAL
        )
        if OFF64:
            tok_n = tok_n.to(tl.int64)
        k_ptrs = k_base + tok_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
        v_ptrs = v_base + tok_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
        if K_PARTIAL:
            k = tl.load(k_ptrs, mask=valid_n[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        p = tl.math.exp2(_mma(q, tl.trans(k), DOT_PREC=DOT_PREC, UPCAST=UPCAST) * qk_scale - lse[:, None])
        if K_PARTIAL:
            # Padding keys are zero, so they add nothing to dQ, but exp2 of their score could
            # overflow for a row with a very negative LSE, and inf * 0 is NaN.
            if padded_n:
                p = tl.where(valid_n[None, :], p, 0.0)
            v = tl.load(v_ptrs, mask=valid_n[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        dp = _mma(do, tl.trans(v), DOT_PREC=DOT_PREC, UPCAST=UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, DOT_PREC=DOT_PREC, UPCAST=UPCAST)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + tok_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    if Q_PARTIAL:
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid_m[:, None])
    else:
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty))


# Which split sets a program's own rows, per kernel (the other split or block is its inner loop).
_PROGRAM_SPLIT = {"fwd": "M_SPLIT", "dkdv": "N_SPLIT", "dq": "M_SPLIT"}


def _tuned(kernel: object, configs: list[triton.Config], program_split: str) -> object:
    key = ["CT", "CH", "CW", "TILE", "HEAD_DIM", "Q_PARTIAL", "K_PARTIAL"]
    prune = {"early_config_prune": _pruner(program_split)}
    return triton.autotune(configs, key=key, prune_configs_by=prune, **_AUTOTUNE_KW)(kernel)


_KERNELS = {
    "fwd": (_bsa_fwd_kernel, FWD_CONFIGS),
    "dkdv": (_bsa_bwd_dkdv_kernel, DKDV_CONFIGS),
    "dq": (_bsa_bwd_dq_kernel, DQ_CONFIGS),
}
_TUNED = {name: _tuned(kernel, configs, _PROGRAM_SPLIT[name]) for name, (kernel, configs) in _KERNELS.items()}


def _launch(name: str, grid, *args: object, **constexprs: object) -> None:
    """Launch kernel ``name`` autotuned, or with a fixed pick under the interpreter or with
    LONGCAT_BSA_AUTOTUNE=0 (Triton's autotuner benchmarks even a single surviving config)."""
    kernel, configs = _KERNELS[name]
    if _INTERPRET or not _AUTOTUNE:
        cfg = _pick(configs, *_sizes(constexprs), _PROGRAM_SPLIT[name])
        kernel[grid(cfg.kwargs)](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _TUNED[name][grid](*args, **constexprs)


def _empty(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    # Every kernel output is allocated here (tests patch it to poison outputs with NaN).
    return torch.empty(shape, device=like.device, dtype=like.dtype if dtype is None else dtype)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a token offset within one (batch, head) slice can pass 2**31 elements."""
    return any((t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3)) >= 2**31 for t in tensors)


@dataclass(frozen=True)
class Plan:
    """Everything about one (q grid, kv grid, chunk) pair that the kernels need besides tensors."""

    q_layout: ChunkLayout
    k_layout: ChunkLayout
    tile: int
    q_geo: TileGeometry
    k_geo: TileGeometry

    def constexprs(self, dtype: torch.dtype, head_dim: int, *tensors: torch.Tensor) -> dict[str, object]:
        return {
            "CT": self.q_layout.chunk[0],
            "CH": self.q_layout.chunk[1],
            "CW": self.q_layout.chunk[2],
            "TILE": self.tile,
            "HEAD_DIM": head_dim,
            "Q_PARTIAL": self.q_layout.partial,
            "K_PARTIAL": self.k_layout.partial,
            "OFF64": _needs_int64(*tensors),
            # fp32 inputs exist for testing against float64; TF32 would cost three digits there.
            "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": _INTERPRET and dtype == torch.bfloat16,
        }

    def grid_args(self) -> tuple[int, ...]:
        _, gh, gw = self.q_layout.grid
        _, nb_h, nb_w = self.q_layout.blocks
        return self.q_layout.grid[0], self.k_layout.grid[0], gh, gw, nb_h, nb_w


@functools.lru_cache(maxsize=64)
def make_plan(q_layout: ChunkLayout, k_layout: ChunkLayout, device: torch.device) -> Plan:
    """The (cached) plan for a query/key layout pair on ``device``."""
    tile = choose_tile(q_layout, k_layout)
    return Plan(
        q_layout=q_layout,
        k_layout=k_layout,
        tile=tile,
        q_geo=tile_geometry(q_layout, tile, device),
        k_geo=tile_geometry(k_layout, tile, device),
    )


def key_tile_lists(kv_list: torch.Tensor, kv_count: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the key tiles (with real rows) of its selected key blocks."""
    return expand_to_tiles(kv_list, kv_count, plan.k_geo)


def query_tile_lists(kv_list: torch.Tensor, kv_count: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block, the query tiles (with real rows) of the query blocks that selected it."""
    selected = mask_from_lists(kv_list, kv_count, plan.k_layout.num_blocks)
    q_list, q_count = lists_from_mask(selected.transpose(-1, -2))
    return expand_to_tiles(q_list, q_count, plan.q_geo)


def bsa_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_tiles: torch.Tensor,
    kv_tile_count: torch.Tensor,
    plan: Plan,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward. Returns (o [B, H, Sq, D], lse2 float32 [B, H, Sq], log2 units).

    o is laid out as [B, Sq, H, D] in memory (a transposed view), so the caller's usual
    ``o.transpose(1, 2).reshape(B, Sq, H * D)`` is free.
    """
    b, n_heads, sq, d = q.shape
    o = _empty((b, sq, n_heads, d), q).transpose(1, 2)
    lse = _empty((b, n_heads, sq), q, torch.float32)

    def grid(meta: dict) -> tuple[int, int]:
        return (plan.q_layout.num_blocks * meta["M_SPLIT"], b * n_heads)

    _launch(
        "fwd", grid,
        q, k, v, o, lse, kv_tiles, kv_tile_count, plan.q_geo.rel, plan.k_geo.rel,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        n_heads, scale * LOG2E,
        *plan.grid_args(), plan.q_layout.num_blocks, kv_tiles.shape[-1],
        **plan.constexprs(q.dtype, d, q, k, v, o),
    )  # fmt: skip
    return o, lse


def bsa_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) in float32, [B, H, S], from raster-order tensors of any strides."""
    b, n_heads, s, d = o.shape
    delta = _empty((b, n_heads, s), o, torch.float32)
    block = 64 if d <= 64 else 32
    _bsa_delta_kernel[(triton.cdiv(s, block), b * n_heads)](
        o, do, delta, s, n_heads, *o.stride(), *do.stride(), HEAD_DIM=d, BLOCK=block
    )
    return delta


def bsa_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    kv_tiles: torch.Tensor,
    kv_tile_count: torch.Tensor,
    q_tiles: torch.Tensor,
    q_tile_count: torch.Tensor,
    plan: Plan,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV (shaped and strided like q, k, v where those are dense) from the forward's LSE."""
    b, n_heads, _, d = q.shape
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    constexprs = plan.constexprs(q.dtype, d, q, k, v, do, dq, dk, dv)

    def grid_dkdv(meta: dict) -> tuple[int, int]:
        return (plan.k_layout.num_blocks * meta["N_SPLIT"], b * n_heads)

    _launch(
        "dkdv", grid_dkdv,
        q, k, v, do, lse, delta, dk, dv, q_tiles, q_tile_count, plan.q_geo.rel, plan.k_geo.rel,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        n_heads, scale * LOG2E, scale,
        *plan.grid_args(), plan.k_layout.num_blocks, q_tiles.shape[-1],
        **constexprs,
    )  # fmt: skip

    def grid_dq(meta: dict) -> tuple[int, int]:
        return (plan.q_layout.num_blocks * meta["M_SPLIT"], b * n_heads)

    _launch(
        "dq", grid_dq,
        q, k, v, do, lse, delta, dq, kv_tiles, kv_tile_count, plan.q_geo.rel, plan.k_geo.rel,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        n_heads, scale * LOG2E, scale,
        *plan.grid_args(), plan.q_layout.num_blocks, kv_tiles.shape[-1],
        **constexprs,
    )  # fmt: skip
    return dq, dk, dv
