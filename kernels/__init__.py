"""Block-sparse attention for LongCat-Video: Triton forward/backward plus a torch reference.

Importing this package does not import Triton; the kernels are built on the first call.
"""

from .block_sparse import (
    BlockSparseArgumentError,
    block_sparse_attention,
    block_sparse_mask,
    block_sparse_reference,
)
from .selection import ChunkLayout, token_blocks, topk_count

__all__ = [
    "BlockSparseArgumentError",
    "ChunkLayout",
    "block_sparse_attention",
    "block_sparse_mask",
    "block_sparse_reference",
    "token_blocks",
    "topk_count",
]
