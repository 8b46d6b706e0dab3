"""What a checkpointed DiT block keeps from its forward instead of recomputing it in the backward.

Gradient checkpointing keeps only each block's inputs and runs the whole block again in the
backward. Some of that work is expensive to redo and cheap to store: self-attention is the
largest kernel per stored byte (one ``[tokens, hidden]`` output and a float32 log-sum-exp per
block), while the element-wise work and most matmuls are cheap to redo. A *level* names what is
kept; PyTorch's selective checkpointing (``torch.utils.checkpoint.create_selective_checkpoint_contexts``)
applies it by op: every op the level's policy marks is run once and its outputs are stored; all
others are recomputed as before.

Levels (each includes the ones above it where the names overlap):

``none``
    recompute everything (plain gradient checkpointing).
``attention``
    the self-attention outputs and their log-sum-exp: the block-sparse kernels' forward op
    (``longcat_bsa::forward``, with its block selection) and aten's fused SDPA forward ops. A call
    whose keys are fewer than its queries is cross-attention to the text (at most 512 tokens
    against thousands of video tokens: cheap to redo, as large to store as self-attention) and is
    recomputed. xFormers' ops are not recognised (the family refuses that combination).
``attention+proj``
    also the outputs of the four matmuls whose output is one hidden-wide vector per token: the
    self-attention output projection, the cross-attention query and output projections, and the
    FFN down-projection.
``attention+ffn``
    ``attention`` plus the outputs of the FFN's three matmuls (the two up-projections and the
    down-projection), the largest activations of a block.

Matmuls are recognised by their operand shapes (``[*, hidden] @ [hidden, hidden]`` and the FFN's
``hidden x ffn_width`` shapes), which in this DiT belong to those layers only; LoRA's low-rank
matmuls never match. The base weights' matmuls of a quantised model (int8, fp8) run other ops and
are recomputed.

With compiled blocks, the checkpoint must be inside the compiled region for the policy to see
single ops (around a compiled block it sees one opaque call): :class:`CompiledCheckpoint` is that
region, compiled once per checkpointed run of blocks. Inductor's partitioner then recomputes only
what the backward needs, so a compiled level never stores an output the backward does not read.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.errors import LongCatVideoError

_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

# The levels a model accepts (the config's "auto" is resolved by the family before it gets here).
LEVELS: tuple[str, ...] = tuple(level for level in spec.CHECKPOINT_SAVES if level != "auto")


def _aten_ops(*names: str) -> frozenset:
    # Not every build has every fused attention op (cuDNN's appeared in torch 2.5).
    return frozenset(getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name))


# aten's fused SDPA forward ops: each returns the output and its log-sum-exp (plus RNG state and sizes).
SDPA_FORWARD_OPS = _aten_ops(
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)
_MATMUL_OPS = _aten_ops("mm", "addmm")


@functools.cache
def block_sparse_forward_op() -> Any:
    """The block-sparse kernels' forward custom op (registered when the kernels module is imported)."""
    from simpletuner_longcat_video.kernels import block_sparse

    return getattr(torch.ops, block_sparse.OP_NAMESPACE).forward.default


def is_self_attention(op: Any, args: Sequence[Any]) -> bool:
    """Whether ``op(*args)`` is a self-attention forward this module's ``attention`` level keeps."""
    if op in SDPA_FORWARD_OPS:
        query, key = args[0], args[1]
        # Self-attention calls have at least as many keys as queries (the I2V split: condition
        # queries against condition keys, noisy queries against all keys); cross-attention has the
        # text's few keys against the video's many queries.
        return key.shape[-2] >= query.shape[-2]
    return op == block_sparse_forward_op()


def _matmul_shape(op: Any, args: Sequence[Any]) -> tuple[int, int] | None:
    """(inner, output width) of an ``mm`` / ``addmm`` call, else None."""
    if op not in _MATMUL_OPS:
        return None
    left, right = (args[0], args[1]) if op == torch.ops.aten.mm.default else (args[1], args[2])
    return int(left.shape[-1]), int(right.shape[-1])


@dataclass(frozen=True)
class SavePolicy:
    """The policy of one level for a DiT of ``hidden`` width and ``ffn_width`` FFN inner width."""

    level: str
    hidden: int
    ffn_width: int

    def __post_init__(self) -> None:
        check_level(self.level)

    @property
    def saved_matmuls(self) -> frozenset[tuple[int, int]]:
        """The (inner, output width) matmul shapes this level keeps."""
        h, f = self.hidden, self.ffn_width
        if self.level == "attention+proj":
            return frozenset({(h, h), (f, h)})
        if self.level == "attention+ffn":
            return frozenset({(h, f), (f, h)})
        return frozenset()

    def keeps(self, op: Any, args: Sequence[Any]) -> bool:
        """Whether this level stores the outputs of ``op(*args)`` instead of recomputing it."""
        if self.level == "none":
            return False
        if is_self_attention(op, args):
            return True
        shape = _matmul_shape(op, args)
        return shape is not None and shape in self.saved_matmuls

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        # MUST_SAVE, so that torch.compile's partitioner does not trade a kept output back for
        # recomputation; everything else is the partitioner's (or eager's) usual recompute.
        return CheckpointPolicy.MUST_SAVE if self.keeps(op, args) else CheckpointPolicy.PREFER_RECOMPUTE


def check_level(level: object, where: str = "longcat_checkpoint_saves") -> str:
    """``level`` if it names a level, else a ``LongCatVideoError`` listing them."""
    if level not in LEVELS:
        raise LongCatVideoError(
            where=where,
            value=level,
            rule=f"must be one of {list(LEVELS)} (what each checkpointed block keeps instead of recomputing)",
            fix='use "attention" (about one hidden-wide tensor per block more; see docs/memory.md), or "none"',
        )
    return level


@functools.cache
def context_fn_for(policy: SavePolicy) -> Callable[[], tuple[Any, Any]]:
    """The ``context_fn`` that makes ``torch.utils.checkpoint.checkpoint`` apply ``policy``.

    One object per policy value: a compiled region guards on the identity of the policy it was traced
    with, so regions that each held their own copy compiled once per block (and past Dynamo's
    recompile limit, 8, the rest would have run uncompiled).
    """
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    # AOTAutograd's on-disk cache skips regions whose context_fn has no stable hash (a second run
    # would compile every region again); this one names the policy and this module's source.
    context_fn.cache_hash = f"{policy!r}:{_SOURCE_HASH}"
    return context_fn


def run_blocks(blocks: Sequence[torch.nn.Module], x: torch.Tensor, *rest: Any) -> torch.Tensor:
    """``x`` through ``blocks`` in order, every block called with the same other arguments."""
    for block in blocks:
        x = block(x, *rest)
    return x


class CompiledCheckpoint(torch.nn.Module):
    """Blocks under one selective checkpoint, meant to be ``torch.compile``'d as one region.

    The blocks are held outside the module tree (no parameters of its own), so the DiT's
    parameter names, ``state_dict`` and adapters are unchanged by it.
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], context_fn: Callable[[], tuple[Any, Any]]) -> None:
        super().__init__()
        self.__dict__["run"] = functools.partial(run_blocks, tuple(blocks))
        self.__dict__["context_fn"] = context_fn

    def forward(self, *args: Any) -> torch.Tensor:
        return checkpoint(self.run, *args, use_reentrant=False, context_fn=self.context_fn)


__all__ = [
    "LEVELS",
    "SDPA_FORWARD_OPS",
    "CompiledCheckpoint",
    "SavePolicy",
    "block_sparse_forward_op",
    "check_level",
    "context_fn_for",
    "is_self_attention",
    "run_blocks",
]
