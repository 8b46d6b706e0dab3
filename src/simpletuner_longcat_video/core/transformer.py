"""LongCat-Video's 13.6B video DiT as a diffusers model, in pure torch + diffusers.

The parameter names (and therefore the module attribute names below) are those of the official
``dit/`` checkpoint, so ``LongCatVideoTransformer3DModel.from_pretrained(<checkpoint>/dit)`` loads
the real download with no missing or unexpected keys. The ``__init__`` arguments are the field
names of the official ``dit/config.json``.

Numerics follow upstream: the residual stream and the big matmuls run in the model dtype, while
the timestep embedding, the adaLN modulation, the norms and the output projection run in float32;
the forward returns float32.

Token layout: latents ``[B, C, T, H, W]`` are patchified with (1, 2, 2) into ``T*(H/2)*(W/2)``
tokens, frame-major. For image-to-video and continuation the first ``num_cond_latents`` latent
frames are clean condition frames: in self-attention they see only themselves, and they skip
cross-attention. Their keys and values are therefore the same at every sampling step;
:meth:`LongCatVideoTransformer3DModel.condition_cache` computes them once and ``forward(...,
condition_cache=)`` then runs the blocks on the noisy frames only. All attention goes through
:mod:`simpletuner_longcat_video.core.attention`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core.attention import (
    AttentionContext,
    AttentionOptions,
    check_options,
    dispatch_attention,
    dispatch_cross_attention,
    registered_backends,
)
from simpletuner_longcat_video.core.context_parallel import FrameShard
from simpletuner_longcat_video.core.selective_checkpoint import (
    CompiledCheckpoint,
    SavePolicy,
    check_level,
    context_fn_for,
    run_blocks,
)
from simpletuner_longcat_video.errors import LongCatVideoError, listed

logger = logging.getLogger(__name__)

# Module-name suffixes of the attention and FFN projections, in PEFT ``target_modules`` form.
# ("attn.proj" does not match "cross_attn.proj": PEFT matches whole dotted components.)
LORA_TARGET_MODULES: tuple[str, ...] = (
    "attn.qkv",
    "attn.proj",
    "cross_attn.q_linear",
    "cross_attn.kv_linear",
    "cross_attn.proj",
    "ffn.w1",
    "ffn.w2",
    "ffn.w3",
)

_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps")


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Leaves any surrounding autocast region for float32 work (a no-op outside one).

    A plain ``torch.autocast(enabled=False)`` in a ``with`` statement, which Dynamo traces into the
    compiled block: entering an autocast object by hand splits the graph at every float32 layer
    (the host trains under accelerate's bf16 autocast; ``tests/test_compile_autocast.py``).
    """
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class FP32Linear(nn.Module):
    """A linear layer that always computes in float32, whatever its storage dtype.

    Upstream runs the timestep MLP, the adaLN modulation and the output projection under
    float32 autocast. Doing the upcast in the layer keeps the same numbers when the weights are
    stored in bf16 and cannot be undone by an outer bf16 autocast region. It is deliberately not
    an ``nn.Linear``: the host's quantisers (optimum-quanto, torchao) convert every
    ``nn.Linear`` they see, and these small precision-critical layers (5% of the weights) must
    stay in the base dtype when the rest of the DiT is stored in int8/fp8.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with _autocast_off(x.device.type):
            return F.linear(x.float(), self.weight.float(), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        with _autocast_off(x.device.type):
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class LongCatRMSNorm(nn.Module):
    """RMSNorm over the last dim: normalised in float32, scaled in the input dtype (as upstream)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class LongCatPatchEmbed3D(nn.Module):
    """Latents ``[B, C, T, H, W]`` to tokens ``[B, T*H'*W', hidden]`` with a strided Conv3d."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LongCatTimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar timestep, then a SiLU MLP; float32 throughout."""

    def __init__(self, t_embed_dim: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            FP32Linear(frequency_embedding_size, t_embed_dim, bias=True),
            nn.SiLU(),
            FP32Linear(t_embed_dim, t_embed_dim, bias=True),
        )

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        # Same operation order as upstream, so the float32 frequencies round identically.
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        angles = t.float()[:, None] * torch.exp(exponent)[None, :]
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if self.frequency_embedding_size % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t))


class LongCatCaptionProjection(nn.Module):
    """Text-encoder states to the model width: Linear, tanh-GELU, Linear."""

    def __init__(self, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(in_channels, hidden_size, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class LongCatRotaryPosEmbed3D(nn.Module):
    """3D rotary position embedding for the video tokens.

    The head dim is split into a time part ``D - 4*(D//6)`` and two equal height/width parts
    ``2*(D//6)``; each part rotates adjacent channel pairs (0,1), (2,3), ... by
    ``position * base**(-2i/part_dim)``, with integer positions on the latent token grid. Angles
    are formed in float32 like upstream, so the rotation matches the trained model bit for bit.
    The returned tables hold one angle per channel pair: ``[S, D/2]`` cos and sin.
    """

    _CACHE_SIZE = 32  # bucketed training visits a handful of grids; keep them all

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 8:
            raise LongCatVideoError(
                where="attention head dim",
                value=head_dim,
                rule="3D RoPE needs a head dim divisible by 8",
                fix="choose hidden_size / num_heads as a multiple of 8",
            )
        self.head_dim = head_dim
        self.base = base
        third = head_dim // 6
        self.part_dims = (head_dim - 4 * third, 2 * third, 2 * third)
        self._cache: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _axis_angles(self, length: int, dim: int, device: torch.device) -> torch.Tensor:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim))
        positions = torch.arange(length, dtype=torch.float32, device=device)
        return positions[:, None] * inv_freq[None, :]

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), device)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        t, h, w = grid
        dt, dh, dw = self.part_dims
        at = self._axis_angles(t, dt, device)[:, None, None, :].expand(t, h, w, dt // 2)
        ah = self._axis_angles(h, dh, device)[None, :, None, :].expand(t, h, w, dh // 2)
        aw = self._axis_angles(w, dw, device)[None, None, :, :].expand(t, h, w, dw // 2)
        angles = torch.cat([at, ah, aw], dim=-1).reshape(t * h * w, self.head_dim // 2)
        tables = (angles.cos(), angles.sin())
        self._cache[key] = tables
        if len(self._cache) > self._CACHE_SIZE:
            self._cache.popitem(last=False)
        return tables


def apply_rotary_3d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` ``[B, heads, S, D]`` by the ``[S, D/2]`` angle tables, in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    even, odd = xf[..., 0], xf[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# The timestep of clean condition frames (upstream's I2V and continuation samplers pass 0).
CONDITION_TIMESTEP = 0.0


def rotary_rows(
    tables: tuple[torch.Tensor, torch.Tensor], first_frame: int, frames: int, frame_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of whole-sequence rotary tables for latent frames ``first_frame .. first_frame + frames - 1``.

    A condition cache and the forward that uses it split one sequence in two; each half keeps the
    positions it has in the whole sequence (condition frames from 0, noisy frames after them).
    """
    cos, sin = tables
    rows = slice(first_frame * frame_tokens, (first_frame + frames) * frame_tokens)
    return cos[rows], sin[rows]


class LongCatSelfAttention(nn.Module):
    """Video self-attention: fused QKV, per-head RMSNorm on q/k, 3D RoPE, the attention seam."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise LongCatVideoError(
                where="hidden_size / num_heads",
                value=(dim, num_heads),
                rule="hidden_size must be divisible by num_heads",
                fix="pick num_heads that divides hidden_size",
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = LongCatRMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = LongCatRMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: AttentionContext,
        cond_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Self-attention of ``x``; with ``cond_kv`` (cached condition keys and values, ``[B, heads,
        Nc, D]``) the tokens of ``x`` are the noisy ones and attend to ``[cond_kv ; their own]``."""
        out, _ = self.attend(x, rope, context, cond_kv)
        return out

    def attend(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: AttentionContext,
        cond_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The attention output and the keys/values of ``x`` (after q/k norm and RoPE)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = apply_rotary_3d(self.q_norm(q), *rope)
        k = apply_rotary_3d(self.k_norm(k), *rope)
        keys, values = k, v
        if cond_kv is not None:
            keys, values = torch.cat([cond_kv[0], k], dim=2), torch.cat([cond_kv[1], v], dim=2)
        out = dispatch_attention(q, keys, values, context)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), (k, v)


class LongCatCrossAttention(nn.Module):
    """Video-to-text attention; per-head RMSNorm on q/k, no positions on either side."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim, bias=True)
        self.kv_linear = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.q_norm = LongCatRMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = LongCatRMSNorm(self.head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, y: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_norm(self.q_linear(x).view(b, n, self.num_heads, self.head_dim))
        k, v = self.kv_linear(y).view(b, y.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        k = self.k_norm(k)
        out = dispatch_cross_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kv_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LongCatSwiGLU(nn.Module):
    """SwiGLU FFN, ``w2(silu(w1 x) * w3 x)``; inner width 2/3 of ``hidden * mlp_ratio``, rounded up to 256."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int = 256) -> None:
        super().__init__()
        inner = int(2 * hidden_dim / 3)
        inner = multiple_of * ((inner + multiple_of - 1) // multiple_of)
        self.inner_dim = inner
        self.w1 = nn.Linear(dim, inner, bias=False)
        self.w2 = nn.Linear(inner, dim, bias=False)
        self.w3 = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _frame_modulation(adaln: nn.Module, temb: torch.Tensor, frames: int) -> torch.Tensor:
    """adaLN parameters ``[B, frames, 1, k*C]`` of the tokens' frames, from ``temb`` ``[B, T', Ct]``.

    A forward with a condition cache hands every frame's embedding (``T' > frames``; its tokens are
    the last frames): the float32 matmul then has the uncached forward's shape, and so its rounding
    (row by row the same numbers, where a shorter matmul may round differently).
    """
    mod = adaln(temb)
    return mod[:, mod.shape[1] - frames :].unsqueeze(2)


def _modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int) -> torch.Tensor:
    # x [B, N, C] viewed per frame against shift/scale [B, T, 1, C]; float32 math, model-dtype result.
    b, n, c = x.shape
    xf = norm(x.view(b, frames, n // frames, c).float())
    return (xf * (1 + scale) + shift).to(x.dtype).view(b, n, c)


def _gated_add(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, frames: int) -> torch.Tensor:
    # Residual add with a per-frame float32 gate; summed in float32 and rounded once, as upstream.
    b, n, c = x.shape
    out = x.view(b, frames, n // frames, c).float() + gate * update.view(b, frames, n // frames, c).float()
    # Cast last: in bf16 the block then returns a fresh tensor, not a view (FSDP2 warns on views).
    return out.view(b, n, c).to(x.dtype)


class LongCatVideoTransformerBlock(nn.Module):
    """One single-stream block: adaLN-modulated self-attention, cross-attention, adaLN SwiGLU FFN."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, adaln_tembed_dim: int) -> None:
        super().__init__()
        # Index 1 of the Sequential is the checkpoint's "adaLN_modulation.1".
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(adaln_tembed_dim, 6 * hidden_size, bias=True))
        self.mod_norm_attn = FP32LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mod_norm_ffn = FP32LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.pre_crs_attn_norm = FP32LayerNorm(hidden_size, eps=1e-6, elementwise_affine=True)
        self.attn = LongCatSelfAttention(hidden_size, num_heads)
        self.cross_attn = LongCatCrossAttention(hidden_size, num_heads)
        self.ffn = LongCatSwiGLU(hidden_size, int(hidden_size * mlp_ratio))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_mask: torch.Tensor | None,
        temb: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        context: AttentionContext,
        cond_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One block. With ``cond_kv`` (``context.cached_condition``) ``hidden_states`` holds the noisy
        tokens only and the condition frames' keys and values come from a :class:`ConditionCache`."""
        return self._run(
            hidden_states, encoder_hidden_states, encoder_mask, temb, (rope_cos, rope_sin), context, cond_kv
        )[0]

    def forward_condition(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        context: AttentionContext,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The block on condition tokens alone (no text): their new states and their keys/values."""
        return self._run(hidden_states, None, None, temb, (rope_cos, rope_sin), context, None)

    def _run(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: AttentionContext,
        cond_kv: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        frames = context.local_frames
        mod = _frame_modulation(self.adaLN_modulation, temb, frames)  # [B, T, 1, 6C], float32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)

        attn_in = _modulate(self.mod_norm_attn, x, shift_msa, scale_msa, frames)
        attn_out, kv = self.attn.attend(attn_in, rope, context, cond_kv)
        x = _gated_add(x, attn_out, gate_msa, frames)

        # Condition tokens get no text: their output must not depend on the prompt. (text is None
        # when the block runs on condition tokens alone, to fill a ConditionCache.)
        if text is not None:
            n_cond = context.local_cond_tokens
            noisy = x[:, n_cond:] if n_cond else x
            noisy = noisy + self.cross_attn(self.pre_crs_attn_norm(noisy), text, text_mask)
            x = torch.cat([x[:, :n_cond], noisy], dim=1) if n_cond else noisy

        ffn_in = _modulate(self.mod_norm_ffn, x, shift_mlp, scale_mlp, frames)
        return _gated_add(x, self.ffn(ffn_in), gate_mlp, frames), kv


class LongCatVideoFinalLayer(nn.Module):
    """adaLN-modulated norm and the float32 projection to patch channels."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int, adaln_tembed_dim: int) -> None:
        super().__init__()
        self.norm_final = FP32LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = FP32Linear(hidden_size, patch_volume * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(adaln_tembed_dim, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        shift, scale = _frame_modulation(self.adaLN_modulation, temb, frames).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final, x, shift, scale, frames))


@dataclasses.dataclass(frozen=True)
class ConditionCache:
    """The condition frames' keys and values in every block (:meth:`LongCatVideoTransformer3DModel.condition_cache`).

    ``keys[i]`` / ``values[i]``: block ``i``'s ``[B, heads, Nc, head_dim]`` after q/k norm and RoPE,
    in the model dtype (``Nc`` = condition frames x tokens per frame). ``output``: the model's float32
    prediction ``[B, C_out, K, H, W]`` for the condition frames, which the cached forward puts in
    front of its noisy frames. ``B`` counts videos; a forward batch of ``r * B`` (CFG: ``r = 2``)
    uses each entry ``r`` times.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    output: torch.Tensor
    num_cond_latents: int
    total_frames: int
    latent_size: tuple[int, int]

    @property
    def batch(self) -> int:
        return self.output.shape[0]

    def check(self, batch: int, latent_shape: tuple[int, int, int], num_cond_latents: int, depth: int) -> int:
        """How many times each cached entry serves a forward of ``batch`` over ``latent_shape`` (T, H, W)."""
        expected = (self.total_frames, *self.latent_size)
        problems = []
        if num_cond_latents != self.num_cond_latents:
            problems.append(f"num_cond_latents {num_cond_latents} (the cache holds {self.num_cond_latents})")
        if tuple(latent_shape) != expected:
            problems.append(f"latent T x H x W {tuple(latent_shape)} (the cache serves {expected})")
        if batch % self.batch:
            problems.append(f"batch {batch} (not a multiple of the cache's {self.batch} videos)")
        if len(self.keys) != depth:
            problems.append(f"{depth} blocks (the cache holds {len(self.keys)})")
        if problems:
            raise LongCatVideoError(
                where="forward(condition_cache=...)",
                value="; ".join(problems),
                rule="a condition cache serves only the sequences it was computed for: the same condition frame "
                "count, latent frames and size, a whole multiple of its batch, and the model that made it",
                fix="compute the cache with condition_cache(cond_latents, total_frames=T) for these latents, "
                "on this model",
            )
        return batch // self.batch

    def block_kv(self, index: int, repeat: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index``'s cached keys and values on ``device``, each entry repeated ``repeat`` times."""
        k, v = self.keys[index].to(device), self.values[index].to(device)
        if repeat > 1 and k.shape[0] == 1:
            # A view: the attention's concatenation with the noisy keys makes the one copy.
            return k.expand(repeat, -1, -1, -1), v.expand(repeat, -1, -1, -1)
        if repeat > 1:
            k, v = k.repeat(repeat, 1, 1, 1), v.repeat(repeat, 1, 1, 1)
        return k, v


def check_blocks_to_swap(value: object, depth: int, where: str = "musubi_blocks_to_swap") -> int:
    """``value`` as a block count to swap: 0 (off) or 1..depth-1 (one block must stay resident)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < depth:
        raise LongCatVideoError(
            where=where,
            value=value,
            rule=f"block swap streams 1 to {depth - 1} of the DiT's {depth} blocks (0 turns it off)",
            fix=f"use a whole number from 1 to {depth - 1}; start with 4-8 and raise it until the step fits",
        )
    return value


# Upstream's run-time switches, which the official dit/config.json carries: accepted on load and
# dropped. Here attention is run-time state (set_attention_options) and context parallelism is
# enable_context_parallel, so the config holds the architecture only (as diffusers' models do).
UPSTREAM_RUNTIME_KEYS = frozenset(
    {"enable_flashattn3", "enable_flashattn2", "enable_xformers", "enable_bsa", "bsa_params", "cp_split_hw"}
)


class LongCatVideoTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """LongCat-Video DiT: 48 single-stream blocks, hidden 4096, 32 heads, patch (1, 2, 2).

    The config holds the architecture only: the fields of the official ``dit/config.json`` except
    upstream's run-time switches (:data:`UPSTREAM_RUNTIME_KEYS`), which are accepted on load and
    ignored. Attention (backend and block-sparse settings) is run-time state, set through
    :meth:`set_attention_options`. ``text_tokens_zero_pad`` follows upstream: when true, padded text tokens are
    zeroed after the caption projection and then attended to like real tokens, so prompts must
    be padded to the inference length (512) and the mask passed; when false, padded tokens are
    masked out of cross-attention exactly and the padding length does not matter.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LongCatVideoTransformerBlock"]
    _repeated_blocks = ["LongCatVideoTransformerBlock"]
    # SimpleTuner's context parallelism asks for a diffusers plan and calls enable_parallelism().
    # The plan is empty on purpose: diffusers' hooks split tokens evenly, ignoring frame
    # boundaries; this model splits by whole frames itself (see enable_parallelism below).
    _cp_plan: dict = {}
    # Small or precision-critical pieces stay out of fp8 layerwise storage.
    _skip_layerwise_casting_patterns = [
        "x_embedder",
        "t_embedder",
        "y_embedder",
        "norm",
        "adaLN_modulation",
        "final_layer",
    ]
    # Tiny weights that upstream applies in float32; cheap to keep there.
    _keep_in_fp32_modules = ["t_embedder", "q_norm", "k_norm", "pre_crs_attn_norm"]

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs: Any) -> Any:
        """diffusers' config reader, minus upstream's run-time switches (silently: they are expected)."""
        kept = {key: value for key, value in config_dict.items() if key not in UPSTREAM_RUNTIME_KEYS}
        return super().extract_init_dict(kept, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        """diffusers' loader, made strict: every weight must match the checkpoint's keys and shapes.

        diffusers only logs missing or unexpected keys and leaves those weights randomly
        initialised (and SimpleTuner then retries without ``low_cpu_mem_usage``, which hides
        them for good), so a renamed or truncated ``dit/`` would train a partly random model.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        where = f"DiT weights in {pretrained_model_name_or_path}"
        if kwargs.get("subfolder"):
            where += f"/{kwargs['subfolder']}"
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except ValueError as error:
            if "expected shape" not in str(error):
                raise
            raise _reshaped_weights_error(where, str(error).split(". ", 1)[0]) from error
        _refuse_mismatched_weights(where, sorted(info["missing_keys"]), sorted(info["unexpected_keys"]))
        return (model, info) if wants_info else model

    @classmethod
    def check_weight_names(cls, checkpoint: str) -> None:
        """The names and shapes in ``checkpoint/dit``'s safetensors headers against this class's weights.

        Reads only the headers (no tensor), so a renamed, truncated or re-shaped ``dit/`` is refused
        in a second, before the host caches anything, with the same message the load would give.
        Folders without safetensors files are left to the loader.
        """
        from safetensors import safe_open

        folder = os.path.join(os.path.expanduser(checkpoint), spec.DIT_SUBFOLDER)
        index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                names = sorted(set(json.load(handle).get("weight_map", {}).values()))
        else:
            names = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
        if not names or not all(os.path.isfile(os.path.join(folder, name)) for name in names):
            return
        found: dict[str, tuple[int, ...]] = {}
        for name in names:
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    found[key] = tuple(handle.get_slice(key).get_shape())
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(folder))
        expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        where = f"DiT weights in {checkpoint}/{spec.DIT_SUBFOLDER}"
        _refuse_mismatched_weights(where, sorted(set(expected) - set(found)), sorted(set(found) - set(expected)))
        reshaped = [key for key in expected if key in found and found[key] != expected[key]]
        if reshaped:
            key = reshaped[0]
            raise _reshaped_weights_error(
                where,
                f"{len(reshaped)} of another shape, e.g. {key} is {list(found[key])}, expected {list(expected[key])}",
            )

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        hidden_size: int = 4096,
        depth: int = 48,
        num_heads: int = 32,
        caption_channels: int = 4096,
        mlp_ratio: int = 4,
        adaln_tembed_dim: int = 512,
        frequency_embedding_size: int = 256,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        text_tokens_zero_pad: bool = False,
    ) -> None:
        super().__init__()
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or patch_size[0] != 1:
            raise LongCatVideoError(
                where="dit config patch_size",
                value=list(patch_size),
                rule="the patch must be 3D and must not compress time (patch_size[0] == 1)",
                fix="use the official [1, 2, 2]",
            )
        self.patch_size = patch_size
        self.out_channels = out_channels

        self.x_embedder = LongCatPatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = LongCatTimestepEmbedder(adaln_tembed_dim, frequency_embedding_size)
        self.y_embedder = LongCatCaptionProjection(caption_channels, hidden_size)
        self.rope = LongCatRotaryPosEmbed3D(hidden_size // num_heads)
        self.blocks = nn.ModuleList(
            [LongCatVideoTransformerBlock(hidden_size, num_heads, mlp_ratio, adaln_tembed_dim) for _ in range(depth)]
        )
        self.final_layer = LongCatVideoFinalLayer(hidden_size, math.prod(patch_size), out_channels, adaln_tembed_dim)

        self.gradient_checkpointing = False
        self._checkpoint_backend = "torch"
        self._checkpoint_saves = "none"  # what a checkpointed block keeps (core/selective_checkpoint.py)
        self._checkpoint_interval: int | None = None  # blocks per checkpoint (the host's interval)
        self._checkpoint_stride: int | None = None  # a checkpointed run starts every stride blocks
        self._compile_options: dict | None = None  # set by compile_blocks
        self._compiled_checkpoints: dict[tuple[int, ...], CompiledCheckpoint] = {}
        self._musubi_block_swap = None  # the host's MusubiBlockSwapManager, found by this name
        self._cp_group = None  # torch.distributed group sharing one sample's frames
        self._compile_timing_pending: set[bool] = set()  # grad modes whose first compiled call is not timed yet
        self.attention_options = AttentionOptions()

    # Two parts of a memory option come from the trainer that runs the model, so the model imports
    # none: the block-swap manager (called with block indices, device, logger) and the checkpoint
    # function that parks saved block inputs in CPU memory ("unsloth"). host/family.py supplies
    # SimpleTuner's through use_trainer_parts when it is imported.
    _trainer_parts: dict[str, Any] = {}

    @classmethod
    def use_trainer_parts(cls, **parts: Any) -> None:
        """Supply ``block_swap_manager`` and/or ``offloaded_checkpoint`` (see the comment above)."""
        unknown = set(parts) - {"block_swap_manager", "offloaded_checkpoint"}
        if unknown:
            raise TypeError(f"use_trainer_parts: unknown parts {sorted(unknown)}")
        cls._trainer_parts = {**cls._trainer_parts, **parts}

    def _trainer_part(self, name: str, where: str) -> Any:
        part = self._trainer_parts.get(name)
        if part is None:
            raise LongCatVideoError(
                where=where,
                value=name,
                rule="this memory option runs through the trainer's implementation, and none was supplied",
                fix="train through SimpleTuner (importing simpletuner_longcat_video.host.family supplies it), "
                "or call LongCatVideoTransformer3DModel.use_trainer_parts first",
            )
        return part

    def set_attention_options(self, options: AttentionOptions | None = None, **changes: Any) -> AttentionOptions:
        """Replace (``options``) and/or edit (keyword fields) the self-attention options; returns them.

        ``backend`` is ``"auto"`` or the name of a registered backend
        (:func:`simpletuner_longcat_video.core.attention.register_backend`, or the entry-point group);
        the options are checked by every backend that reads them.
        """
        new = dataclasses.replace(options or self.attention_options, **changes)
        # Asked here, outside any forward: every availability probe runs now (the block-sparse one
        # compiles and runs its kernels), not lazily inside the first checkpointed block.
        known = registered_backends()
        if new.backend != "auto" and new.backend not in known:
            raise LongCatVideoError(
                where="attention backend",
                value=new.backend,
                rule=f"no such backend is registered (known: auto, {', '.join(known)})",
                fix="install the package that provides it, or choose 'auto' or 'sdpa'",
            )
        try:
            check_options(new)
        except ValueError as error:
            raise LongCatVideoError(
                where="attention options",
                value=new,
                rule=f"a backend that reads them refuses them ({error})",
                fix="use values inside the rule named (the defaults are upstream's)",
            ) from error
        self.attention_options = new
        return new

    def enable_block_swap(self, blocks_to_swap: int, device: str | torch.device = "cpu") -> None:
        """Keep the last ``blocks_to_swap`` blocks on ``device`` and stream each one onto the compute
        device for its forward and backward pass (SimpleTuner's Musubi block swap).

        ``0`` turns swapping off. The blocks move when the first forward runs (or when the host
        places the model); LoRA weights inside swapped blocks stay on the compute device.
        """
        depth = len(self.blocks)
        check_blocks_to_swap(blocks_to_swap, depth)
        if blocks_to_swap == 0:
            self._musubi_block_swap = None
            return
        manager = self._trainer_part("block_swap_manager", "musubi_blocks_to_swap")
        self._musubi_block_swap = manager(list(range(depth - blocks_to_swap, depth)), torch.device(device), logger)

    def _place_swapped_trainables(self, device: torch.device) -> None:
        # The host adds the LoRA while the DiT is in CPU memory and then moves every block but the
        # swapped ones; on CUDA its manager streams only a checkpointed block's frozen weights (its
        # pinned H2D ring), so LoRA weights left in CPU memory stayed there: the H200 run stopped in
        # the first step with "mat2 is on cpu, different from other tensors on cuda:0". Trainable
        # weights (and their gradients) live on the compute device, as this class promises.
        for param in self._swapped_trainables_elsewhere(device):
            param.data = param.data.to(device)
            if param.grad is not None:
                param.grad = param.grad.to(device)

    def _swapped_trainables_elsewhere(self, device: torch.device) -> list[nn.Parameter]:
        return [
            param
            for index in self.swapped_blocks
            for param in self.blocks[index].parameters()
            if param.requires_grad and param.device != device
        ]

    @property
    def swapped_blocks(self) -> list[int]:
        """Indices of the blocks that block swap streams (empty when it is off)."""
        swap = self._musubi_block_swap
        return sorted(swap.block_indices) if swap is not None else []

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` every block (they share one graph).

        Eager mode spends about a third of a full-size training step in small float32
        element-wise kernels (adaLN modulation, gated residuals, rotary embedding, LoRA adds);
        compiling the block fuses them. Call it after adapters are added.
        """
        # Settle the backend registry (entry points, availability probes) eagerly, so the traced
        # blocks see plain lookups rather than locks and kernel probes.
        registered_backends()
        # Static graphs: a run sees a few shapes (its buckets, the CFG batch of validation, the
        # cached-condition call), and with automatic dynamic shapes the later ones compiled
        # symbolic graphs, slower on the H200 and failing in Inductor on CPU (see sampling_step.py).
        options.setdefault("dynamic", False)
        for block in self.blocks:
            block.compile(**options)
        # Training and sampling compile separate graphs (grad mode is a guard): time the first of each.
        self._compile_timing_pending = {True, False}
        # Selective checkpointing needs the checkpoint inside the compiled region (see
        # core/selective_checkpoint.py); those regions compile lazily, with the same options.
        self._compile_options = dict(options)
        self._compiled_checkpoints.clear()

    def enable_context_parallel(self, group: Any | None) -> None:
        """Split every sample's latent frames between the ranks of ``group`` (``None`` turns it off).

        All ranks of the group must call forward with the same inputs; each computes its frames,
        self-attention is made whole by an all-to-all over heads, and every rank returns the whole
        prediction. See :mod:`simpletuner_longcat_video.core.context_parallel` for the gradient rule.
        """
        if group is not None and self.config.num_heads % dist.get_world_size(group):
            raise LongCatVideoError(
                where="context_parallel_size",
                value=dist.get_world_size(group),
                rule=f"the all-to-all over heads needs a size that divides the model's {self.config.num_heads} heads",
                fix="use 2, 4 or 8 ranks per sample (the official model has 32 heads)",
            )
        self._cp_group = group

    @property
    def context_parallel_enabled(self) -> bool:
        """Whether a process group splits each sample's frames (:meth:`enable_context_parallel`)."""
        return self._cp_group is not None

    def enable_parallelism(self, *, config: Any, cp_plan: dict | None = None) -> None:
        """SimpleTuner's context-parallel entry point: take the group from its device mesh.

        diffusers' own version installs token-splitting hooks and places the mesh on an
        accelerator device (it fails on CPU); this model needs neither, only the process group.
        Both of the host's rotations (``allgather`` and ``alltoall``) run as the all-to-all over
        heads here: the result is the same and every rank holds only its share of the keys.
        """
        cp_config = getattr(config, "context_parallel_config", config)
        if getattr(config, "tensor_parallel_config", None) is not None or not hasattr(cp_config, "ulysses_degree"):
            raise LongCatVideoError(
                where="parallelism config",
                value=type(config).__name__,
                rule="LongCat-Video supports context parallelism only (no tensor parallelism)",
                fix="use context_parallel_size, data parallelism or FSDP2",
            )
        mesh = cp_config.mesh
        if mesh is None:
            raise LongCatVideoError(
                where="context parallel config",
                value="mesh=None",
                rule="the trainer must pass the device mesh holding the 'ring' and 'ulysses' dimensions",
                fix="let SimpleTuner set it up through context_parallel_size",
            )
        axis = "ulysses" if cp_config.ulysses_degree > 1 else "ring"
        self.enable_context_parallel(mesh[axis].get_group())
        logger.info(
            "context parallelism: %d ranks per sample, frames split between them, all-to-all over heads",
            dist.get_world_size(self._cp_group),
        )

    def set_gradient_checkpointing_backend(self, backend: str) -> None:
        """Host hook: ``"torch"`` recomputes each block; ``"unsloth"`` also parks the saved block
        inputs in CPU memory (the host's activation offload)."""
        if backend not in ("torch", "unsloth"):
            raise LongCatVideoError(
                where="gradient_checkpointing_backend",
                value=backend,
                rule="LongCat-Video checkpoints whole blocks; it supports 'torch' and 'unsloth'",
                fix="use 'torch' (recompute) or 'unsloth' (recompute, saved inputs on the CPU)",
            )
        self._checkpoint_backend = backend

    def set_checkpoint_saves(self, level: str) -> None:
        """What each checkpointed block keeps from its forward instead of recomputing it.

        One of :data:`simpletuner_longcat_video.core.selective_checkpoint.LEVELS`: ``"none"`` (the
        default: recompute everything), ``"attention"``, ``"attention+proj"``, ``"attention+ffn"``.
        """
        self._checkpoint_saves = check_level(level)
        self._compiled_checkpoints.clear()

    @property
    def checkpoint_saves(self) -> str:
        """The level set by :meth:`set_checkpoint_saves`."""
        return self._checkpoint_saves

    def set_gradient_checkpointing_interval(self, interval: int | None) -> None:
        """Host hook (``gradient_checkpointing_interval``): checkpoint ``interval`` consecutive blocks as
        one region, so only every ``interval``-th block input is kept (the host's Wan and Flux rule).

        ``None`` or 1 checkpoints every block on its own. Refused with block swap: its hooks stream
        one block at a time, and a region of several recomputes them together.
        """
        _check_block_count(
            interval,
            where="gradient_checkpointing_interval",
            rule="must be a whole number of blocks per checkpoint, at least 1",
            fix="leave it unset (every block checkpointed on its own) or use e.g. 2",
        )
        self._checkpoint_interval = None if interval in (None, 1) else interval
        self._compiled_checkpoints.clear()

    def set_gradient_checkpointing_segment_stride(self, stride: int | None) -> None:
        """Host hook (``gradient_checkpointing_segment_stride``): a checkpointed region of ``interval``
        blocks starts every ``stride`` blocks; the blocks between run without checkpointing (they keep
        all their activations: faster, more memory)."""
        _check_block_count(
            stride,
            where="gradient_checkpointing_segment_stride",
            rule="must be a whole number of blocks, at least gradient_checkpointing_interval",
            fix="leave it unset, or use a stride >= the interval",
        )
        self._checkpoint_stride = stride
        self._compiled_checkpoints.clear()

    def checkpoint_plan(self) -> list[tuple[range, bool]]:
        """The blocks in runs, each run either checkpointed as one region (True) or run plainly."""
        depth = len(self.blocks)
        size = self._checkpoint_interval or 1
        stride = self._checkpoint_stride or size
        if stride < size:
            raise LongCatVideoError(
                where="gradient_checkpointing_segment_stride",
                value=stride,
                rule=f"must be at least gradient_checkpointing_interval ({size}): a stride window holds one region",
                fix=f"use a stride of {size} or more, or leave it unset",
            )
        plan = []
        for start in range(0, depth, stride):
            plan.append((range(start, min(start + size, depth)), True))
            if start + size < min(start + stride, depth):
                plan.append((range(start + size, min(start + stride, depth)), False))
        return plan

    def _run_checkpointed(self, indices: range, *args: Any) -> torch.Tensor:
        blocks = [self.blocks[i] for i in indices]
        function = blocks[0] if len(blocks) == 1 else functools.partial(run_blocks, blocks)
        kept: dict[str, Any] = {}  # the checkpoint's context_fn when the level keeps something
        if self._checkpoint_saves != "none":
            policy = SavePolicy(self._checkpoint_saves, self.config.hidden_size, self.blocks[0].ffn.inner_dim)
            if self._compile_options is not None:
                return self._compiled_checkpoint(indices, policy)(*args)
            kept["context_fn"] = context_fn_for(policy)
        if self._checkpoint_backend == "unsloth":
            offloaded_checkpoint = self._trainer_part("offloaded_checkpoint", "gradient_checkpointing_backend")
            return offloaded_checkpoint(function, *args, use_reentrant=False, **kept)
        if kept:
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kept)
        return self._gradient_checkpointing_func(function, *args)

    def _compiled_checkpoint(self, indices: range, policy: SavePolicy) -> CompiledCheckpoint:
        if self._checkpoint_backend == "unsloth":
            # The host's offload hooks pack what a checkpoint saves; inside a compiled region they
            # cannot run, and around it they would store what the policy keeps on the CPU too.
            raise LongCatVideoError(
                where="longcat_checkpoint_saves",
                value=f"{policy.level} with compiled blocks and gradient_checkpointing_backend 'unsloth'",
                rule="a compiled block keeps its saves inside the compiled region, where the host's offload "
                "hooks cannot run",
                fix="set longcat_checkpoint_saves to none with unsloth and compiled blocks, or use the 'torch' backend",
            )
        key = tuple(indices)
        region = self._compiled_checkpoints.get(key)
        if region is None:
            region = CompiledCheckpoint([self.blocks[i] for i in indices], context_fn_for(policy))
            region.compile(**self._compile_options)
            self._compiled_checkpoints[key] = region
        return region

    def _compute_dtype(self) -> torch.dtype:
        dtype = self.x_embedder.proj.weight.dtype
        # fp8 storage (layerwise casting, quantisation) is not a compute dtype.
        return dtype if dtype in _COMPUTE_DTYPES else torch.bfloat16

    @staticmethod
    def _frame_timesteps(timestep: torch.Tensor | float, batch: int, frames: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            if t.shape[0] not in (1, batch):
                raise LongCatVideoError(
                    where="timestep shape",
                    value=tuple(t.shape),
                    rule=f"expected [B={batch}] or [B, T={frames}]",
                    fix="pass one timestep per sample or one per sample and latent frame",
                )
            t = t.expand(batch)[:, None].expand(batch, frames)
        elif t.ndim == 2 and t.shape[0] in (1, batch) and t.shape[1] in (1, frames):
            t = t.expand(batch, frames)
        else:
            raise LongCatVideoError(
                where="timestep shape",
                value=tuple(t.shape),
                rule=f"expected [B={batch}] or [B, T={frames}]",
                fix="pass one timestep per sample or one per sample and latent frame",
            )
        return t

    @staticmethod
    def _text_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.ndim == 4 and mask.shape[1:3] == (1, 1):
            mask = mask[:, 0, 0]
        elif mask.ndim == 3 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.shape != (batch, length):
            raise LongCatVideoError(
                where="encoder_attention_mask shape",
                value=tuple(mask.shape),
                rule=f"expected [B, L] = [{batch}, {length}] (or [B, 1, 1, L]) with nonzero for valid tokens",
                fix="pass the tokenizer's attention mask for the padded prompt",
            )
        return mask != 0

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        num_cond_latents: int = 0,
        return_dict: bool = True,
        condition_cache: ConditionCache | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow for ``hidden_states``; returns float32 ``[B, out_channels, T, H, W]``.

        Args:
            hidden_states: latents ``[B, C, T, H, W]``; ``H`` and ``W`` divisible by the patch.
            timestep: ``[B]`` or per-frame ``[B, T]`` on the scheduler's 0..1000 scale. For
                image-to-video the caller sets the condition frames' entries (upstream uses 0).
            encoder_hidden_states: text states ``[B, 1, L, C_text]`` or ``[B, L, C_text]``.
            encoder_attention_mask: ``[B, L]`` or ``[B, 1, 1, L]``, nonzero where a token is real.
            num_cond_latents: leading latent frames that are clean condition (0 = text-to-video).
            return_dict: return a ``Transformer2DModelOutput`` instead of a 1-tuple.
            condition_cache: the condition frames' keys and values from :meth:`condition_cache`
                (``num_cond_latents`` must match it). The blocks then run on the noisy frames only;
                the first ``num_cond_latents`` frames of ``hidden_states`` and ``timestep`` are not
                read, and the output's condition frames are the cache's own prediction for them
                (what the uncached forward computes there, within rounding).
        """
        batch, grid = self._token_grid(hidden_states)
        if not 0 <= num_cond_latents < grid[0]:
            raise LongCatVideoError(
                where="num_cond_latents",
                value=num_cond_latents,
                rule=f"must be at least 0 and below the {grid[0]} latent frames (some frames must be noisy)",
                fix="use 0 for text-to-video and 1 for image-to-video",
            )
        if condition_cache is not None:
            return self._forward_cached(
                hidden_states,
                timestep,
                encoder_hidden_states,
                encoder_attention_mask,
                num_cond_latents,
                return_dict,
                condition_cache,
            )
        device = hidden_states.device
        dtype = self._compute_dtype()

        temb = self._embed_timesteps(timestep, batch, grid[0], device, dtype)
        y, text_mask = self._embed_text(encoder_hidden_states, encoder_attention_mask, batch, dtype)

        x = self.x_embedder(hidden_states.to(dtype))
        rope_cos, rope_sin = self.rope(grid, device)
        shard = None if self._cp_group is None else FrameShard.for_grid(self._cp_group, grid)
        if shard is not None:
            # Everything before this point is replicated on the group's ranks; keep our frames.
            x = shard.split(x, 1)
            temb = shard.split(temb, 1)
            rope_cos, rope_sin = shard.split(rope_cos, 0), shard.split(rope_sin, 0)
        context = AttentionContext(
            grid=grid,
            num_cond_tokens=num_cond_latents * grid[1] * grid[2],
            options=self.attention_options,
            shard=shard,
        )

        grad = torch.is_grad_enabled()
        checkpointing = grad and self.gradient_checkpointing
        timed = grad in self._compile_timing_pending and not torch.compiler.is_compiling()
        started = time.perf_counter() if timed else 0.0
        rest = (y, text_mask, temb, rope_cos, rope_sin, context)
        for run, checkpointed in self._block_runs(device, checkpointing):
            if checkpointed:
                x = self._run_checkpointed(run, x, *rest)
            else:
                x = run_blocks([self.blocks[i] for i in run], x, *rest)

        if timed:
            self._log_first_compiled_call(grad, device, started)
        x = self.final_layer(x, temb, context.local_frames)
        if shard is not None:
            x = shard.gather(x)
        out = self._unpatchify(x, grid).float()
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def _log_first_compiled_call(self, grad: bool, device: torch.device, started: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._compile_timing_pending.discard(grad)
        logger.info(
            "LongCat-Video compiled blocks: the first %s forward took %.1f s, compiling included%s",
            "training" if grad else "sampling",
            time.perf_counter() - started,
            " (the backward compiles at its first call)" if grad else "",
        )

    def condition_cache(
        self, cond_latents: torch.Tensor, *, num_cond_latents: int | None = None, total_frames: int
    ) -> ConditionCache:
        """The condition frames' keys and values in every block, computed once for a whole sampling.

        The leading condition frames are clean (timestep 0), attend only to themselves and skip
        cross-attention, so their states in every block, and with them their keys and values
        (after q/k norm and RoPE at their positions in the whole sequence), are the same at every
        denoising step and in both CFG branches. Pass the result to :meth:`forward` as
        ``condition_cache``: the blocks then run on the noisy tokens only.

        Args:
            cond_latents: normalised latents ``[B, C, Tc, H, W]``, one entry per video (not per CFG
                branch: the cache is repeated to the forward's batch, which must be a multiple of B
                laid out as whole copies, e.g. ``[negative; positive]``).
            num_cond_latents: how many leading frames of ``cond_latents`` are the condition
                (default: all ``Tc``).
            total_frames: the latent frame count of the sequences the cache will serve (condition
                plus noisy frames); the forward refuses other lengths.

        Runs the blocks once at batch B (block swap streams them as in a forward; compiled blocks
        run this pass eagerly). Memory: two ``[B, heads, Nc, head_dim]`` tensors per block in the
        model dtype, about 1.14 GiB for one 832x480 condition frame and 4.57 GiB for 4 (13 pixel
        frames) on the full model in bf16.
        """
        self._refuse_cache_with_context_parallel()
        hook = getattr(self, "_hf_hook", None)
        if hook is not None:
            # Not a forward, so run the model's pre-forward hook as one would: diffusers' model CPU
            # offload (pipe.enable_model_cpu_offload) moves the DiT onto the GPU there.
            hook.pre_forward(self)
        batch, (frames, height, width) = self._token_grid(cond_latents)
        count = frames if num_cond_latents is None else num_cond_latents
        if not 1 <= count <= frames or not count < total_frames:
            raise LongCatVideoError(
                where="condition_cache: num_cond_latents / total_frames",
                value=f"{count} of {frames} given latent frames, total_frames={total_frames}",
                rule="a condition cache holds 1 or more of the given latent frames, fewer than total_frames "
                "(some frames must be noisy)",
                fix="pass the condition latents [B, C, K, H, W] and the whole sequence's latent frame count",
            )
        device = cond_latents.device
        dtype = self._compute_dtype()
        frame_tokens = height * width
        x = self.x_embedder(cond_latents[:, :, :count].to(dtype))
        temb = self._embed_timesteps(torch.full((batch, count), CONDITION_TIMESTEP), batch, count, device, dtype)
        whole = (total_frames, height, width)
        rope_cos, rope_sin = rotary_rows(self.rope(whole, device), 0, count, frame_tokens)
        # The condition frames alone: the backend call the uncached forward makes for their queries.
        context = AttentionContext(
            grid=(count, height, width), num_cond_tokens=count * frame_tokens, options=self.attention_options
        )
        keys, values = [], []
        for block in self._streamed_blocks(device, False):
            x, (k, v) = block.forward_condition(x, temb, rope_cos, rope_sin, context)
            keys.append(k)
            values.append(v)
        output = self._unpatchify(self.final_layer(x, temb, count), (count, height, width)).float()
        return ConditionCache(
            keys=tuple(keys),
            values=tuple(values),
            output=output,
            num_cond_latents=count,
            total_frames=total_frames,
            latent_size=tuple(cond_latents.shape[3:]),
        )

    def _forward_cached(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        num_cond_latents: int,
        return_dict: bool,
        cache: ConditionCache,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        self._refuse_cache_with_context_parallel()
        batch, grid = self._token_grid(hidden_states)
        repeat = cache.check(batch, tuple(hidden_states.shape[2:]), num_cond_latents, len(self.blocks))
        device = hidden_states.device
        dtype = self._compute_dtype()
        count = cache.num_cond_latents
        noisy_frames = grid[0] - count
        frame_tokens = grid[1] * grid[2]

        # Every frame's embedding: the blocks keep the noisy frames' modulation (_frame_modulation).
        temb = self._embed_timesteps(timestep, batch, grid[0], device, dtype)
        y, text_mask = self._embed_text(encoder_hidden_states, encoder_attention_mask, batch, dtype)
        # The patch embedding is per frame, so the noisy frames embed alone as they would in the
        # whole sequence; their rotary rows are those of their positions after the condition.
        x = self.x_embedder(hidden_states[:, :, count:].to(dtype))
        rope_cos, rope_sin = rotary_rows(self.rope(grid, device), count, noisy_frames, frame_tokens)
        context = AttentionContext(
            grid=grid,
            num_cond_tokens=count * frame_tokens,
            options=self.attention_options,
            cached_condition=True,
        )
        grad = torch.is_grad_enabled()
        checkpointing = grad and self.gradient_checkpointing
        timed = grad in self._compile_timing_pending and not torch.compiler.is_compiling()
        started = time.perf_counter() if timed else 0.0
        for index, block in enumerate(self._streamed_blocks(device, checkpointing)):
            kv = cache.block_kv(index, repeat, device)
            if checkpointing:
                x = self._run_checkpointed(
                    range(index, index + 1), x, y, text_mask, temb, rope_cos, rope_sin, context, kv
                )
            else:
                x = block(x, y, text_mask, temb, rope_cos, rope_sin, context, kv)
        if timed:
            self._log_first_compiled_call(grad, device, started)

        x = self.final_layer(x, temb, noisy_frames)
        noisy = self._unpatchify(x, (noisy_frames, grid[1], grid[2])).float()
        out = torch.cat([cache.output.to(device).repeat(repeat, 1, 1, 1, 1), noisy], dim=2)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def _refuse_cache_with_context_parallel(self) -> None:
        if self._cp_group is not None:
            raise LongCatVideoError(
                where="condition KV cache",
                value="context parallelism on (enable_context_parallel / context_parallel_size)",
                rule="the condition KV cache and context parallelism cannot be combined (the cache holds whole "
                "condition frames, context parallelism splits frames between ranks)",
                fix="sample with use_kv_cache=False under context parallelism, or turn context parallelism off "
                "(enable_context_parallel(None)) to use the cache",
            )

    def _block_runs(self, device: torch.device, checkpointing: bool) -> Iterator[tuple[range, bool]]:
        """The blocks as runs to call, ``(indices, checkpointed)`` (see :meth:`checkpoint_plan`); with block
        swap, one block per run, each swapped block streamed onto ``device`` around its run."""
        plan = self.checkpoint_plan() if checkpointing else [(range(len(self.blocks)), False)]
        if self._musubi_block_swap is None:
            yield from plan
            return
        if checkpointing and (self._checkpoint_interval or self._checkpoint_stride):
            raise LongCatVideoError(
                where="gradient_checkpointing_interval",
                value=f"{self._checkpoint_interval} with musubi_blocks_to_swap",
                rule="block swap streams one block at a time, and a checkpoint of several blocks recomputes them together",
                fix="leave gradient_checkpointing_interval unset with block swap",
            )
        for index, _ in enumerate(self._streamed_blocks(device, checkpointing)):
            yield range(index, index + 1), checkpointing

    def _streamed_blocks(self, device: torch.device, checkpointing: bool) -> Iterator[nn.Module]:
        """The blocks in order, each swapped block streamed onto ``device`` around its use."""
        swap = self._musubi_block_swap
        swapping = swap is not None and swap.activate(self.blocks, device, torch.is_grad_enabled())
        if swapping:
            self._place_swapped_trainables(device)
        for index, block in enumerate(self.blocks):
            streamed = swapping and swap.is_managed_block(index)
            if streamed:
                swap.stream_in(block, device, checkpointed=checkpointing)
            yield block
            if streamed:
                swap.stream_out(block)

    def _embed_timesteps(
        self, timestep: torch.Tensor, batch: int, frames: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Per-frame timestep embeddings ``[B, frames, Ct]``."""
        # Upstream hands the timestep to the model in the model dtype; rounding it the same way
        # (bf16 has 8 mantissa bits) keeps the embedding identical to the trained model's.
        t = self._frame_timesteps(timestep, batch, frames, device).to(dtype)
        return self.t_embedder(t.flatten()).view(batch, frames, -1)

    def _token_grid(self, hidden_states: torch.Tensor) -> tuple[int, tuple[int, int, int]]:
        batch, _, frames, height, width = hidden_states.shape
        pt, ph, pw = self.patch_size
        if height % ph or width % pw:
            raise LongCatVideoError(
                where="latent height x width",
                value=(height, width),
                rule=f"must be divisible by the patch size {ph}x{pw}",
                fix="use frame sizes that are multiples of 16 pixels",
            )
        return batch, (frames // pt, height // ph, width // pw)

    def _embed_text(
        self, states: torch.Tensor, mask: torch.Tensor | None, batch: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected text states and the mask cross-attention needs (``None``: every token counts)."""
        text = states
        if text.ndim == 4:
            if text.shape[1] != 1:
                raise LongCatVideoError(
                    where="encoder_hidden_states shape",
                    value=tuple(text.shape),
                    rule="expected [B, 1, L, C] or [B, L, C]",
                    fix="drop the extra axis",
                )
            text = text[:, 0]
        text = text.to(dtype)
        text_mask = self._text_mask(mask, batch, text.shape[1])
        if text_mask is not None and self.config.text_tokens_zero_pad:
            return self.y_embedder(text) * text_mask[..., None].to(dtype), None
        if text_mask is not None:
            text, text_mask = self._drop_padding(text, text_mask)
        return self.y_embedder(text), text_mask

    @staticmethod
    def _drop_padding(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Tokens that no sample uses cost compute and nothing else; with one prompt (or equal
        # lengths) the mask then disappears and cross-attention can use unmasked fused kernels.
        keep = mask.any(dim=0)
        n_keep = int(keep.sum())
        if n_keep == 0:
            return text[:, :1], mask[:, :1]
        if n_keep < mask.shape[1]:
            text, mask = text[:, keep], mask[:, keep]
        return (text, None) if bool(mask.all()) else (text, mask)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        pt, ph, pw = self.patch_size
        x = x.view(x.shape[0], t, h, w, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], self.out_channels, t * pt, h * ph, w * pw)


__all__ = [
    "CONDITION_TIMESTEP",
    "LORA_TARGET_MODULES",
    "ConditionCache",
    "FP32LayerNorm",
    "FP32Linear",
    "LongCatCaptionProjection",
    "LongCatCrossAttention",
    "LongCatPatchEmbed3D",
    "LongCatRMSNorm",
    "LongCatRotaryPosEmbed3D",
    "LongCatSelfAttention",
    "LongCatSwiGLU",
    "LongCatTimestepEmbedder",
    "LongCatVideoFinalLayer",
    "LongCatVideoTransformer3DModel",
    "LongCatVideoTransformerBlock",
    "apply_rotary_3d",
    "check_blocks_to_swap",
    "rotary_rows",
]


def _check_block_count(value: object, *, where: str, rule: str, fix: str) -> None:
    """``value`` must be None or a whole number of blocks, at least 1 (the host's checkpoint keys)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LongCatVideoError(where=where, value=value, rule=rule, fix=fix)


def _reshaped_weights_error(where: str, value: str) -> LongCatVideoError:
    """The error for DiT weights whose shapes differ from the config's (from the load or the headers)."""
    return LongCatVideoError(
        where=where,
        value=value,
        rule="every tensor must have the shape the DiT's config.json gives it",
        fix="keep the config.json that was saved with these weights (the official dit/config.json for "
        "the official weights)",
    )


def _refuse_mismatched_weights(where: str, missing: list[str], unexpected: list[str]) -> None:
    """A ``LongCatVideoError`` naming missing / unexpected DiT weight names, if there are any."""
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {listed(unexpected)}")
    raise LongCatVideoError(
        where=where,
        value="; ".join(parts),
        rule="the DiT checkpoint must hold exactly the official LongCat-Video parameter names "
        "(a missing weight would train from random values)",
        fix="use the unmodified dit/ folder of meituan-longcat/LongCat-Video, or re-save converted "
        "weights with LongCatVideoTransformer3DModel.save_pretrained",
    )
