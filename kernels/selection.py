"""Chunk geometry and block selection for block-sparse attention, in plain torch.

Tokens stay in raster order (t, h, w) of their latent grid; nothing is regrouped in memory. A
"block" is one 3D chunk of the grid, numbered in raster order of the chunk grid. Where a grid
dimension is not a multiple of the chunk, chunks at the far edge are partial. The kernels number a
block's rows "real first": its real cells in raster order of the cells it covers, then padding;
and they work in tiles of ``tile`` rows, skipping tiles that hold padding only, so a half-empty edge
chunk costs half the work. ``TileGeometry`` holds the small tables that make this arithmetic.

Nothing here is differentiated: selection is a discrete choice made from detached statistics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class ChunkLayout:
    """A token grid (t, h, w) cut into ``chunk``-sized blocks; ``blocks`` is the chunk grid."""

    grid: Grid
    chunk: Grid

    @property
    def blocks(self) -> Grid:
        return (
            math.ceil(self.grid[0] / self.chunk[0]),
            math.ceil(self.grid[1] / self.chunk[1]),
            math.ceil(self.grid[2] / self.chunk[2]),
        )

    @property
    def num_blocks(self) -> int:
        return math.prod(self.blocks)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def block_volume(self) -> int:
        return math.prod(self.chunk)

    @property
    def partial(self) -> bool:
        """Whether some block has padding cells (a grid dimension is not a multiple of the chunk)."""
        return any(g % c for g, c in zip(self.grid, self.chunk, strict=True))

    def block_tokens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Real-token count of every block, float32 [num_blocks]."""
        extents = [
            torch.clamp(g - torch.arange(n, device=device) * c, max=c).to(torch.float32)
            for g, c, n in zip(self.grid, self.chunk, self.blocks, strict=True)
        ]
        return (extents[0][:, None, None] * extents[1][None, :, None] * extents[2][None, None, :]).reshape(-1)


def token_blocks(grid: Grid, chunk: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """Block index of every raster token of ``grid``: a LongTensor of length ``T * H * W``."""
    layout = ChunkLayout(tuple(grid), tuple(chunk))
    _, nh, nw = layout.blocks
    t, h, w = (torch.arange(g, device=device) // c for g, c in zip(grid, chunk, strict=True))
    return ((t[:, None, None] * nh + h[None, :, None]) * nw + w[None, None, :]).reshape(-1)


def pooled_means(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Mean over the real tokens of every block, float32 [B, heads, num_blocks, D]."""
    b, h, _, d = x.shape
    (gt, gh, gw), (ct, ch, cw), (nt, nh, nw) = layout.grid, layout.chunk, layout.blocks
    x = x.reshape(b, h, gt, gh, gw, d)
    if layout.partial:
        # Zero cells add nothing to the sums; the division below uses real-token counts only.
        x = F.pad(x, (0, 0, 0, nw * cw - gw, 0, nh * ch - gh, 0, nt * ct - gt))
    sums = x.reshape(b, h, nt, ct, nh, ch, nw, cw, d).sum(dim=(3, 5, 7), dtype=torch.float32)
    return sums.reshape(b, h, nt * nh * nw, d) / layout.block_tokens(x.device)[:, None]


def topk_count(sparsity: float | None, num_key_blocks: int) -> int:
    """Key blocks kept per query block by the top-k rule: ``floor((1 - sparsity) * n)``, at least 1."""
    if sparsity is None:
        return 1
    # The epsilon keeps e.g. (1 - 0.9) * 10 = 0.9999999 from flooring to 0.
    return max(1, min(num_key_blocks, math.floor((1.0 - sparsity) * num_key_blocks + 1e-6)))


def lists_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact the True columns of a boolean mask into ascending index lists plus counts (int32).

    Entries past a row's count are unspecified (the kernels never read them).
    """
    counts = mask.sum(-1, dtype=torch.int32)
    # A stable sort on "not kept" moves kept columns to the front and keeps them ascending.
    lists = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return lists.contiguous(), counts.contiguous()


def mask_from_lists(lists: torch.Tensor, counts: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Boolean [..., rows, num_cols] mask with True at the first ``counts`` entries of each list."""
    valid = torch.arange(lists.shape[-1], device=lists.device) < counts.unsqueeze(-1)
    # Entries past the count are routed to an extra column that is dropped afterwards.
    cols = torch.where(valid, lists.to(torch.int64), num_cols)
    mask = torch.zeros(*lists.shape[:-1], num_cols + 1, dtype=torch.bool, device=lists.device)
    mask.scatter_(-1, cols, True)
    return mask[..., :num_cols]


def select_from_scores(
    scores: torch.Tensor, *, sparsity: float | None, cdf_threshold: float | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept key blocks per query block: (indices int32 [..., Nq, W], counts int32 [..., Nq]).

    Top-k keeps ``topk_count(sparsity, Nk)`` blocks. The CDF rule keeps the smallest set of
    highest-weight blocks whose softmax(scale * scores) mass reaches ``cdf_threshold``; with both
    rules the larger set wins. Every query block keeps at least one key block. Indices are
    ascending within each row's first ``count`` entries, so kernels walk keys in memory order.
    """
    num_k = scores.shape[-1]
    n_top = topk_count(sparsity, num_k)
    if cdf_threshold is None:
        lists = torch.topk(scores, n_top, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
        counts = torch.full(scores.shape[:-1], n_top, dtype=torch.int32, device=scores.device)
        return lists.contiguous(), counts

    weights = torch.softmax(scores.to(torch.float32) * scale, dim=-1)
    order = torch.sort(weights, dim=-1, descending=True)
    mass_before = torch.cumsum(order.values, dim=-1) - order.values
    # A block is needed while the mass ranked above it is still short of the threshold.
    n_cdf = (mass_before < cdf_threshold).sum(-1)
    counts = torch.clamp(n_cdf, min=n_top, max=num_k)
    keep_sorted = torch.arange(num_k, device=scores.device) < counts.unsqueeze(-1)
    mask = torch.zeros_like(keep_sorted).scatter_(-1, order.indices, keep_sorted)
    return lists_from_mask(mask)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    q_layout: ChunkLayout,
    k_layout: ChunkLayout,
    *,
    sparsity: float | None,
    cdf_threshold: float | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score block pairs by the dot product of mean-pooled q and k, then select (see select_from_scores).

    q: [B, heads, Sq, D], k: [B, heads, Sk, D], raster order. Returns int32 lists and counts.
    """
    with torch.no_grad():
        num_k = k_layout.num_blocks
        if cdf_threshold is None and topk_count(sparsity, num_k) >= num_k:
            # Dense: no scores needed; every query block lists every key block.
            shape = (*q.shape[:2], q_layout.num_blocks)
            lists = torch.arange(num_k, device=q.device, dtype=torch.int32).expand(*shape, num_k)
            counts = torch.full(shape, num_k, device=q.device, dtype=torch.int32)
            return lists.contiguous(), counts
        scores = pooled_means(q.detach(), q_layout) @ pooled_means(k.detach(), k_layout).transpose(-1, -2)
        return select_from_scores(scores, sparsity=sparsity, cdf_threshold=cdf_threshold, scale=scale)


def _padded_rows(layout: ChunkLayout, tile: int) -> int:
    """Rows the kernels compute for ``layout`` when every block is visited in ``tile``-row tiles."""
    tiles = torch.div(layout.block_tokens().to(torch.int64) + tile - 1, tile, rounding_mode="floor")
    return int(tiles.sum()) * tile


def choose_tile(q_layout: ChunkLayout, k_layout: ChunkLayout) -> int:
    """Rows per list tile: the whole chunk, or half of it where that skips enough padding.

    A program owns a whole chunk and walks the other side in list tiles, so the work is
    (own rows, padded to chunks) x (other rows, padded to tiles), for the forward/dQ and the dK/dV
    direction alike. Half tiles are taken when they cut that by more than 5% (on a 480p grid,
    24x30x52, edge chunks are half empty: 15% of the key rows are padding with whole-chunk tiles).
    """
    volume = q_layout.block_volume
    half = volume // 2
    if half < 16 or not (q_layout.partial or k_layout.partial):
        return volume

    def work(tile: int) -> int:
        return _padded_rows(q_layout, volume) * _padded_rows(k_layout, tile) + _padded_rows(
            k_layout, volume
        ) * _padded_rows(q_layout, tile)

    return half if work(half) < 0.95 * work(volume) else volume


@dataclass(frozen=True)
class TileGeometry:
    """Tables the kernels use to turn (tile, row) into a token of a partial grid.

    A block's class is ``4 * (t partial) + 2 * (h partial) + (w partial)``; ``rel[c, r]`` is the
    token offset of real row ``r`` from the block's first cell and ``n_real[c]`` its real-row count.
    Tile ``i`` is rows ``(i % tiles_per_chunk) * tile ...`` of block ``i // tiles_per_chunk``;
    ``tiles_per_block`` counts the tiles of each block that hold at least one real row.
    """

    tile: int
    rel: torch.Tensor
    n_real: torch.Tensor
    tiles_per_block: torch.Tensor

    @property
    def tiles_per_chunk(self) -> int:
        return self.rel.shape[1] // self.tile


@functools.lru_cache(maxsize=64)
def _tile_geometry(layout: ChunkLayout, tile: int, device: str) -> TileGeometry:
    (gt, gh, gw), (ct, ch, cw) = layout.grid, layout.chunk
    volume = layout.block_volume
    rel = torch.zeros(8, volume, dtype=torch.int32)
    n_real = torch.zeros(8, dtype=torch.int32)
    for cls in range(8):
        # Extents of a block of this class; a class that cannot occur gets the full chunk.
        tb = gt % ct if cls & 4 and gt % ct else ct
        hb = gh % ch if cls & 2 and gh % ch else ch
        wb = gw % cw if cls & 1 and gw % cw else cw
        a, b, c = torch.meshgrid(torch.arange(tb), torch.arange(hb), torch.arange(wb), indexing="ij")
        offsets = ((a * gh + b) * gw + c).reshape(-1)
        rel[cls, : offsets.numel()] = offsets.to(torch.int32)
        n_real[cls] = offsets.numel()
    tiles_per_block = torch.div(layout.block_tokens().to(torch.int64) + tile - 1, tile, rounding_mode="floor")
    dev = torch.device(device)
    return TileGeometry(tile=tile, rel=rel.to(dev), n_real=n_real.to(dev), tiles_per_block=tiles_per_block.to(dev))


def tile_geometry(layout: ChunkLayout, tile: int, device: torch.device | str) -> TileGeometry:
    """The (cached) tile tables of ``layout`` for tiles of ``tile`` rows, on ``device``."""
    return _tile_geometry(layout, int(tile), str(torch.device(device)))


def expand_to_tiles(
    lists: torch.Tensor, counts: torch.Tensor, geometry: TileGeometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists -> lists of the tiles (with real rows) of those blocks, in block order."""
    per_chunk = geometry.tiles_per_chunk
    if per_chunk == 1:
        return lists, counts
    blocks = lists.to(torch.int64)
    sub = torch.arange(per_chunk, device=lists.device)
    candidates = blocks.unsqueeze(-1) * per_chunk + sub
    in_list = (torch.arange(lists.shape[-1], device=lists.device) < counts.unsqueeze(-1)).unsqueeze(-1)
    keep = (in_list & (sub < geometry.tiles_per_block[blocks].unsqueeze(-1))).flatten(-2)
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)
    tile_lists = torch.gather(candidates.flatten(-2), -1, order).to(torch.int32)
    return tile_lists.contiguous(), keep.sum(-1, dtype=torch.int32)
