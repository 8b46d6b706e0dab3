"""The CUDA caching allocator's setting for a LongCat-Video run: expandable segments.

Measured through the host on the H200 (2026-12-02, 832x480x93 I2V, the default config): the
training step allocates at most 66.7 GiB, but PyTorch's default allocator had reserved 78.1 GiB
(78.8 GiB on the device), because each step's activations of different sizes leave partly used
fixed-size segments behind. With expandable segments a segment grows and shrinks in place, so
what is reserved stays close to what is allocated (figures in docs/memory.md). A user's own
``PYTORCH_CUDA_ALLOC_CONF`` always wins: this only fills it in when it is unset.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

SETTING = "expandable_segments:True"
ENV = "PYTORCH_CUDA_ALLOC_CONF"


def prefer_expandable_segments(environ: MutableMapping[str, str] | None = None) -> str:
    """Turn on expandable segments for this process (and its children) unless the user chose a setting.

    Returns what happened, for the log. The environment variable covers processes started later;
    the allocator of this process, which may have read the variable already, is told directly.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENV):
        return f"{ENV}={environ[ENV]} (yours, kept)"
    if not torch.cuda.is_available():
        return "no CUDA device: allocator left as it is"
    environ[ENV] = SETTING
    set_settings = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if set_settings is not None:
        set_settings(SETTING)
    return f"{ENV}={SETTING} (set by the plugin: reserved memory stays near allocated; set {ENV} yourself to change it)"
