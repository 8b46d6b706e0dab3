"""Context parallelism: one sample's video tokens spread over the ranks of a process group.

The transformer splits its token sequence between the ranks by whole latent frames (rank ``r``
holds a contiguous run of frames), so everything in a block except self-attention is local:
per-frame adaLN modulation, the image-to-video condition frames (all on the first rank), text
cross-attention and the FFN. Self-attention is made whole with an all-to-all over heads
(the Ulysses scheme upstream uses for inference): each rank sends the heads it does not own and
receives every token of the heads it does, attends over the full sequence with any backend of
the attention seam (dense or block-sparse; the image-to-video split works unchanged on the full
sequence), and a second all-to-all hands the tokens back. The final output is gathered so every
rank sees the whole prediction.

Gradient convention (the same as diffusers' context-parallel hooks, which SimpleTuner's trainer
compensates for): every rank computes the same loss on the gathered output; the gather's backward
keeps only the rank's own slice, the split's backward leaves zeros elsewhere, so each rank holds
a partial gradient and the sum over the group is the single-process gradient. The host multiplies
the loss by the group size before data-parallel averaging to get exactly that sum.

Frames are split as evenly as they go (the first ``T % P`` ranks take one frame more). Uneven
shares are padded to the longest for the collectives and trimmed again, so the padding never
reaches attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from simpletuner_longcat_video.errors import LongCatVideoError


def frame_counts(frames: int, world: int) -> tuple[int, ...]:
    """Latent frames per rank: contiguous, balanced, the first ``frames % world`` ranks get one more."""
    if world < 1 or frames < world:
        raise LongCatVideoError(
            where="context_parallel_size",
            value=world,
            rule=f"context parallelism splits the {frames} latent frames between the ranks; every rank needs one",
            fix=f"use at most {frames} ranks for context parallelism, or train on longer clips",
        )
    base, extra = divmod(frames, world)
    return tuple(base + (1 if r < extra else 0) for r in range(world))


@dataclass(frozen=True)
class FrameShard:
    """Which frames of a ``(T, H, W)`` token grid this rank holds, and the group that holds the rest."""

    group: Any  # torch.distributed.ProcessGroup
    rank: int
    frames: tuple[int, ...]
    tokens_per_frame: int

    @classmethod
    def for_grid(cls, group: Any, grid: tuple[int, int, int]) -> FrameShard:
        world = dist.get_world_size(group)
        return cls(
            group=group,
            rank=dist.get_rank(group),
            frames=frame_counts(grid[0], world),
            tokens_per_frame=grid[1] * grid[2],
        )

    @property
    def world(self) -> int:
        return len(self.frames)

    @property
    def start_frame(self) -> int:
        return sum(self.frames[: self.rank])

    @property
    def local_frames(self) -> int:
        return self.frames[self.rank]

    @property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(f * self.tokens_per_frame for f in self.frames)

    @property
    def local_tokens(self) -> slice:
        start = self.start_frame * self.tokens_per_frame
        return slice(start, start + self.local_frames * self.tokens_per_frame)

    def local_cond_tokens(self, num_cond_tokens: int) -> int:
        """How many of this rank's tokens are condition tokens (they lead the sequence)."""
        span = self.local_tokens
        return max(0, min(num_cond_tokens, span.stop) - span.start)

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's part of a tensor every rank holds whole (``dim`` indexes tokens or frames)."""
        per = x.shape[dim] // sum(self.frames)
        start = self.start_frame * per
        return x.narrow(dim, start, self.local_frames * per)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole ``[B, S, C]`` sequence from every rank's ``[B, S_r, C]`` part."""
        return _GatherTokens.apply(x, self)

    def seq_to_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """``[N, B, heads, S_r, D]`` local tokens of all heads -> ``[N, B, heads/P, S, D]`` all tokens of own heads."""
        # Heads divide by the group size: enable_context_parallel checked it when the group was set.
        n, b, heads, _, d = qkv.shape
        world = self.world
        longest = max(self.token_counts)
        x = _pad_tokens(qkv, longest)
        # Chunk j of dim 0 goes to rank j: head group j of every local token.
        x = x.view(n, b, world, heads // world, longest, d).permute(2, 0, 1, 3, 4, 5).contiguous()
        x = all_to_all_single(torch.empty_like(x), x, group=self.group)
        # Chunk i came from rank i: its tokens (padded) for this rank's heads, in sequence order.
        parts = [x[i, :, :, :, :count] for i, count in enumerate(self.token_counts)]
        return torch.cat(parts, dim=3)

    def heads_to_seq(self, out: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`seq_to_heads` for one tensor: ``[B, heads/P, S, D]`` -> ``[B, heads, S_r, D]``."""
        b, head_group, _, d = out.shape
        longest = max(self.token_counts)
        parts = torch.split(out, list(self.token_counts), dim=2)
        x = torch.stack([_pad_tokens(p, longest) for p in parts])  # [P, B, heads/P, longest, D]
        x = all_to_all_single(torch.empty_like(x), x.contiguous(), group=self.group)
        # Chunk i came from rank i: this rank's tokens for head group i.
        x = x.permute(1, 0, 2, 3, 4).reshape(b, self.world * head_group, longest, d)
        return x[:, :, : self.token_counts[self.rank]]


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    # Tokens are the second-to-last axis of every tensor that crosses ranks here.
    missing = length - x.shape[-2]
    return torch.nn.functional.pad(x, (0, 0, 0, missing)) if missing else x


class _GatherTokens(torch.autograd.Function):
    """All-gather along tokens whose backward keeps the rank's own slice (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shard: FrameShard) -> torch.Tensor:
        ctx.shard = shard
        longest = max(shard.token_counts)
        padded = _pad_tokens(x, longest).contiguous()
        pieces = [torch.empty_like(padded) for _ in range(shard.world)]
        dist.all_gather(pieces, padded, group=shard.group)
        return torch.cat([p[:, :count] for p, count in zip(pieces, shard.token_counts, strict=True)], dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[:, ctx.shard.local_tokens].contiguous(), None


__all__ = ["FrameShard", "frame_counts"]
