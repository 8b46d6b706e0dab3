"""The IMG2VIDEO / T2V pipeline on a tiny random checkpoint loaded from the official layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from simpletuner_longcat_video.core.pipeline import cfg_zero, check_video_size, normalize_latents
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.testing.tiny import synthetic_clip

SIZE = dict(height=64, width=64, num_frames=9)


def start_image(index: int = 0) -> Image.Image:
    return Image.fromarray(synthetic_clip(index, frames=1, height=64, width=64)[0])


def run(pipe, seed: int = 0, **kwargs):
    steps = []

    def record(_pipe, index, t, tensors):
        steps.append(tensors["latents"].clone())
        return tensors

    kwargs = {"prompt": "a red square moves", "num_inference_steps": 3, "guidance_scale": 4.0, **SIZE, **kwargs}
    out = pipe(
        generator=torch.Generator().manual_seed(seed), callback_on_step_end=record, show_progress=False, **kwargs
    )
    return out.frames, steps


def test_i2v_first_latent_is_the_encoded_start_image_at_every_step(tiny_pipeline):
    image = start_image()
    frames, steps = run(tiny_pipeline, image=image, output_type="latent")
    initial, num_cond = tiny_pipeline.prepare_latents(1, 64, 64, 9, image, torch.Generator().manual_seed(0))
    encoded = initial[:, :, :1]
    assert num_cond == 1 and len(steps) == 3
    for latents in steps:
        assert torch.equal(latents[:, :, :1], encoded)  # exactly, at every step
    initial = torch.randn(frames.shape, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(steps[-1][:, :, 1:], initial[:, :, 1:])  # later frames were denoised
    assert (steps[0][:, :, 1:] - steps[-1][:, :, 1:]).abs().max() > 1e-3


def posterior(pipe, image):
    pixels = pipe.video_processor.preprocess([image], height=64, width=64).unsqueeze(2)
    return pipe.vae.encode(pixels).latent_dist


def test_start_image_latent_is_a_seeded_draw_from_the_vae_posterior(tiny_pipeline):
    image = start_image()
    draw = tiny_pipeline.encode_image([image], 64, 64, torch.Generator().manual_seed(3))
    assert torch.equal(draw, tiny_pipeline.encode_image([image], 64, 64, torch.Generator().manual_seed(3)))
    assert not torch.allclose(draw, tiny_pipeline.encode_image([image], 64, 64, torch.Generator().manual_seed(4)))
    dist = posterior(tiny_pipeline, image)
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(draw, normalize_latents(dist.mean + dist.std * noise, tiny_pipeline.vae), atol=1e-5)
    mode = tiny_pipeline.encode_image([image], 64, 64, sample=False)
    assert torch.allclose(mode, normalize_latents(dist.mean, tiny_pipeline.vae), atol=1e-6)
    assert (draw - mode).abs().mean() > 0.1 * dist.std.mean()  # a draw, not the mode


def test_noise_is_drawn_before_the_start_image_as_upstream_does(tiny_pipeline):
    image = start_image()
    i2v, _ = tiny_pipeline.prepare_latents(1, 64, 64, 9, image, torch.Generator().manual_seed(5))
    t2v, num_cond = tiny_pipeline.prepare_latents(1, 64, 64, 9, None, torch.Generator().manual_seed(5))
    assert num_cond == 0 and torch.equal(i2v[:, :, 1:], t2v[:, :, 1:])
    generator = torch.Generator().manual_seed(5)
    torch.randn(t2v.shape, generator=generator)  # what the noise took from the generator
    assert torch.equal(i2v[:, :, :1], tiny_pipeline.encode_image([image], 64, 64, generator))


def test_a_cpu_generator_draws_noise_for_a_pipeline_on_another_device(tiny_pipeline, monkeypatch):
    """The host's validation hands a CPU generator to a pipeline on the GPU (on the H200 the noise
    draw raised "Expected a 'cuda' device type for generator but found 'cpu'"). CUDA's rule is
    applied here to every torch.randn, and the pipeline runs on "meta" as its other device."""
    real_randn = torch.randn

    def randn_as_cuda_checks_it(*args, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device or "cpu").type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return real_randn(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", randn_as_cuda_checks_it)
    monkeypatch.setattr(type(tiny_pipeline), "_execution_device", property(lambda self: torch.device("meta")))
    latents, num_cond = tiny_pipeline.prepare_latents(1, 64, 64, 9, None, torch.Generator().manual_seed(5))
    assert latents.device.type == "meta" and num_cond == 0
    assert latents.shape == (1, 16, 3, 8, 8)


def test_each_video_of_a_start_image_gets_its_own_draw(tiny_pipeline):
    draws = tiny_pipeline.encode_image([start_image()], 64, 64, torch.Generator().manual_seed(0), num_latents=2)
    assert draws.shape[0] == 2 and not torch.allclose(draws[0], draws[1])
    with pytest.raises(LongCatVideoError, match="one start image"):
        tiny_pipeline.encode_image([start_image(0), start_image(1)], 64, 64, num_latents=3)


def test_i2v_start_image_decides_the_output(tiny_pipeline):
    a, _ = run(tiny_pipeline, image=start_image(0), output_type="np")
    b, _ = run(tiny_pipeline, image=start_image(1), output_type="np")
    assert a.shape == (1, 9, 64, 64, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.abs(a - b).mean() > 1e-3


def test_text_to_video_without_image(tiny_pipeline):
    frames, steps = run(tiny_pipeline, output_type="pil")
    assert len(frames) == 1 and len(frames[0]) == 9 and frames[0][0].size == (64, 64)
    assert not torch.equal(steps[0][:, :, :1], steps[-1][:, :, :1])  # no frame is held fixed


def test_cfg_without_negative_prompt_uses_the_empty_prompt(tiny_pipeline):
    auto, _ = run(tiny_pipeline, image=start_image(), output_type="latent")
    empty, _ = run(tiny_pipeline, image=start_image(), output_type="latent", negative_prompt="")
    other, _ = run(tiny_pipeline, image=start_image(), output_type="latent", negative_prompt="blue circle")
    assert torch.equal(auto, empty)
    assert not torch.allclose(auto, other)


def test_guidance_one_skips_the_negative_branch(tiny_pipeline):
    a, _ = run(tiny_pipeline, output_type="latent", guidance_scale=1.0, negative_prompt="blue circle")
    b, _ = run(tiny_pipeline, output_type="latent", guidance_scale=1.0)
    assert torch.equal(a, b)


def test_cfg_zero_scale_is_per_sample():
    gen = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 4, 3, 2, 2, generator=gen), torch.randn(2, 4, 3, 2, 2, generator=gen)
    out = cfg_zero(cond, uncond, 4.0)
    for i in range(2):
        c, u = cond[i].flatten().double(), uncond[i].flatten().double()
        s = (c @ u) / (u @ u + 1e-8)
        expected = u * s + 4.0 * (c - u * s)
        assert torch.allclose(out[i].flatten().double(), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("height", "width", "frames", "message"),
    [
        (60, 64, 9, "divisible by 16"),
        (64, 72, 9, "divisible by 16"),
        (64, 64, 8, r"\(frames - 1\) % 4 == 0.*use 5 or 9"),
    ],
)
def test_bad_geometry_is_refused_before_any_work(tiny_pipeline, height, width, frames, message):
    with pytest.raises(LongCatVideoError, match=message):
        tiny_pipeline(prompt="x", height=height, width=width, num_frames=frames, num_inference_steps=1)
    with pytest.raises(LongCatVideoError, match=message):
        check_video_size(height, width, frames)
