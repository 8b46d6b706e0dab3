"""The DiT's condition KV cache: computed once, it gives the uncached forward's prediction.

The leading condition latent frames are clean (timestep 0), attend only to themselves and skip
cross-attention, so their keys and values are the same at every step and in both CFG branches.
``condition_cache`` computes them once; ``forward(condition_cache=)`` runs the blocks on the noisy
tokens only. What is checked, on a tiny model in float32:

* cached == uncached (within float32 rounding) for one condition frame (image-to-video) and four
  (13 pixel frames, continuation), with a CFG batch (each video's cache used by both halves) and
  two videos, text masks of different lengths;
* the check catches a cache made with a wrong timestep or a wrong RoPE offset (mutations);
* every backend sees the calls it sees without the cache (same query and key grids);
* block swap streams the blocks in the cache pass and in the cached forward, with the same result;
* refusals: a cache for other latents, and the cache under context parallelism.

Block-sparse attention (the real Triton kernels under TRITON_INTERPRET=1) with the cache, eager and
in compiled blocks, is checked in test_compile_block_sparse.py's worker (one interpreter for both).
"""

from __future__ import annotations

import pytest
import torch
from _tiny_dit import TINY

from simpletuner_longcat_video.core import attention
from simpletuner_longcat_video.core import transformer as transformer_module
from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel
from simpletuner_longcat_video.errors import LongCatVideoError

# Float32 rounding: the cache pass runs the condition tokens at batch 1 in their own matmuls.
RTOL = 1e-5
# A cache made wrong moves the prediction by orders of magnitude more.
MUTATION_FLOOR = 1e-3


def tiny_model(seed: int = 0, **overrides: object) -> LongCatVideoTransformer3DModel:
    torch.manual_seed(seed)
    model = LongCatVideoTransformer3DModel(**{**TINY, **overrides})
    # Weights that make every block mix frames visibly, and q/k norms that make attention sharp
    # enough for positions to matter (near-uniform attention would hide a wrong RoPE offset).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.fill_(2.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def cfg_inputs(videos: int, frames: int, cond: int, seed: int = 1, size: tuple[int, int] = (8, 12)):
    """A CFG batch: [negative; positive] text for ``videos`` videos, one latent per video repeated."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(videos, 16, frames, *size, generator=gen)
    batch = 2 * videos
    text = torch.randn(batch, 1, 9, 32, generator=gen)
    mask = torch.ones(batch, 9, dtype=torch.long)
    mask[0, 4:] = 0  # an empty-ish negative prompt, a longer positive one
    timesteps = torch.full((batch, frames), 700.0)
    timesteps[:, :cond] = 0.0
    return torch.cat([latents, latents]), timesteps, text, mask, latents[:, :, :cond]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def cached_and_uncached(model, videos: int, frames: int, cond: int) -> tuple[torch.Tensor, torch.Tensor]:
    latents, timesteps, text, mask, cond_latents = cfg_inputs(videos, frames, cond)
    with torch.no_grad():
        full = model(latents, timesteps, text, mask, num_cond_latents=cond, return_dict=False)[0]
        cache = model.condition_cache(cond_latents, total_frames=frames)
        # The cache never reads the condition frames of the input: noise there must not matter.
        scrambled = latents.clone()
        scrambled[:, :, :cond] = torch.randn_like(scrambled[:, :, :cond])
        cached = model(
            scrambled, timesteps, text, mask, num_cond_latents=cond, return_dict=False, condition_cache=cache
        )[0]
    return cached, full


@pytest.mark.parametrize(
    "videos,frames,cond",
    [(1, 3, 1), (1, 6, 4), (2, 6, 4)],
    ids=["i2v-1-cond-latent", "continuation-13-frames", "two-videos"],
)
def test_cached_forward_equals_uncached(videos, frames, cond):
    model = tiny_model()
    cached, full = cached_and_uncached(model, videos, frames, cond)
    assert cached.shape == full.shape and cached.dtype == torch.float32
    assert _rel(cached[:, :, cond:], full[:, :, cond:]) <= RTOL
    # The condition frames of the output: the cache's own prediction for them, as uncached.
    assert _rel(cached[:, :, :cond], full[:, :, :cond]) <= RTOL
    # Both CFG halves of a video share its cache, yet differ by their prompt.
    assert _rel(full[:videos, :, cond:], full[videos:, :, cond:]) > 1e-2


def _shift_condition_rows(rows):
    def shifted(tables, first_frame, frames, frame_tokens):
        return rows(tables, first_frame + (1 if first_frame == 0 else 0), frames, frame_tokens)

    return shifted


def _noisy_rows_from_zero(rows):
    def from_zero(tables, first_frame, frames, frame_tokens):
        return rows(tables, 0, frames, frame_tokens)

    return from_zero


@pytest.mark.parametrize("mutation", ["timestep-500", "condition-rope-offset", "noisy-rope-from-zero"])
def test_the_equality_check_catches_a_wrong_cache(monkeypatch, mutation):
    model = tiny_model()
    if mutation == "timestep-500":
        monkeypatch.setattr(transformer_module, "CONDITION_TIMESTEP", 500.0)
    elif mutation == "condition-rope-offset":
        monkeypatch.setattr(transformer_module, "rotary_rows", _shift_condition_rows(transformer_module.rotary_rows))
    else:
        monkeypatch.setattr(transformer_module, "rotary_rows", _noisy_rows_from_zero(transformer_module.rotary_rows))
    cached, full = cached_and_uncached(model, 1, 6, 4)
    assert _rel(cached[:, :, 4:], full[:, :, 4:]) > MUTATION_FLOOR


def _recording_backend(calls: list) -> attention.Backend:
    def attend(q, k, v, *, q_grid, kv_grid, options):
        calls.append((q.shape[0], tuple(q_grid), tuple(kv_grid)))
        return attention.sdpa_backend(q, k, v, q_grid=q_grid, kv_grid=kv_grid, options=options)

    return attention.Backend("recording", attend)


def test_backends_see_the_uncached_grids():
    calls: list = []
    attention.register_backend(_recording_backend(calls))
    try:
        model = tiny_model()
        model.set_attention_options(backend="recording")
        latents, timesteps, text, mask, cond_latents = cfg_inputs(1, 6, 4)
        with torch.no_grad():
            model(latents, timesteps, text, mask, num_cond_latents=4)
            uncached, calls[:] = list(calls), []
            cache = model.condition_cache(cond_latents, total_frames=6)
            cache_pass, calls[:] = list(calls), []
            model(latents, timesteps, text, mask, num_cond_latents=4, condition_cache=cache)
            cached = list(calls)
    finally:
        attention.unregister_backend("recording")
    cond_call, noisy_call = (2, (4, 4, 6), (4, 4, 6)), (2, (2, 4, 6), (6, 4, 6))
    assert uncached == [cond_call, noisy_call] * TINY["depth"]
    # The cache pass: the condition queries at batch 1 (one video); the steps: the noisy queries only.
    assert cache_pass == [(1, (4, 4, 6), (4, 4, 6))] * TINY["depth"]
    assert cached == [noisy_call] * TINY["depth"]


def test_cache_shapes_and_memory_layout():
    model = tiny_model()
    _, _, _, _, cond_latents = cfg_inputs(1, 6, 4)
    with torch.no_grad():
        cache = model.condition_cache(cond_latents, total_frames=6)
    tokens = 4 * 4 * 6
    assert len(cache.keys) == len(cache.values) == TINY["depth"]
    assert all(k.shape == (1, 4, tokens, 16) and k.dtype == torch.float32 for k in (*cache.keys, *cache.values))
    assert cache.output.shape == (1, 16, 4, 8, 12) and cache.batch == 1


def test_block_swap_streams_the_cache_pass_and_the_cached_forward():
    from simpletuner_longcat_video.host import family  # noqa: F401  (hands the host's block swap to the DiT)

    plain, swapped = tiny_model(depth=3), tiny_model(depth=3)
    swapped.enable_block_swap(1, "cpu:0")  # "cpu:0" differs from "cpu": the host's real protocol runs
    streamed: list[str] = []
    manager = swapped._musubi_block_swap
    stream_in = manager.stream_in

    def recording_in(block, device, checkpointed=None):
        streamed.append("in")
        return stream_in(block, device, checkpointed)

    manager.stream_in = recording_in
    results = []
    for model in (plain, swapped):
        latents, timesteps, text, mask, cond_latents = cfg_inputs(1, 6, 4)
        with torch.no_grad():
            cache = model.condition_cache(cond_latents, total_frames=6)
            results.append(model(latents, timesteps, text, mask, num_cond_latents=4, condition_cache=cache).sample)
    assert torch.equal(results[0], results[1])
    assert len(streamed) >= 2  # block 2 was streamed in for the cache pass and for the forward


def test_a_cache_for_other_latents_is_refused():
    model = tiny_model()
    latents, timesteps, text, mask, cond_latents = cfg_inputs(1, 6, 4)
    with torch.no_grad():
        cache = model.condition_cache(cond_latents, total_frames=6)
        with pytest.raises(LongCatVideoError, match=r"num_cond_latents 1 \(the cache holds 4\)"):
            model(latents, timesteps, text, mask, num_cond_latents=1, condition_cache=cache)
        with pytest.raises(LongCatVideoError, match=r"latent T x H x W \(5, 8, 12\) \(the cache serves \(6, 8, 12\)\)"):
            model(latents[:, :, :5], timesteps[:, :5], text, mask, num_cond_latents=4, condition_cache=cache)
        two = model.condition_cache(torch.cat([cond_latents, cond_latents]), total_frames=6)
        three = [torch.cat([x, x[:1]]) for x in (latents, timesteps, text, mask)]
        with pytest.raises(LongCatVideoError, match=r"batch 3 \(not a multiple of the cache's 2 videos\)"):
            model(*three, num_cond_latents=4, condition_cache=two)
        with pytest.raises(LongCatVideoError, match=r"fewer than total_frames"):
            model.condition_cache(cond_latents, total_frames=4)


def test_the_cache_is_refused_under_context_parallelism(monkeypatch):
    model = tiny_model()
    _, _, _, _, cond_latents = cfg_inputs(1, 6, 4)
    monkeypatch.setattr(model, "_cp_group", object())  # what enable_context_parallel stores
    with pytest.raises(LongCatVideoError, match="condition KV cache and context parallelism cannot be combined"):
        model.condition_cache(cond_latents, total_frames=6)


def test_the_cache_pass_runs_the_models_pre_forward_hook():
    """diffusers' model CPU offload moves the DiT to the GPU in an accelerate pre-forward hook; the
    cache pass is not a forward, so it must run that hook itself (else: CPU weights, GPU latents)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    calls = []

    class Recording(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(type(module).__name__)
            return args, kwargs

    model = tiny_model()
    add_hook_to_module(model, Recording())
    _, _, _, _, cond_latents = cfg_inputs(1, 6, 4)
    with torch.no_grad():
        model.condition_cache(cond_latents, total_frames=6)
    assert calls == ["LongCatVideoTransformer3DModel"]
