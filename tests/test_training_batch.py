"""Image-to-video training batches: the start frame is clean, at t=0, and outside the loss (real numbers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from simpletuner_longcat_video.core.conditioning import apply_i2v_condition, drop_condition_frames
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host.family import LongCatVideo


def host_like_batch(batch: int = 2, frames: int = 3, with_condition: bool = True, seed: int = 0) -> dict:
    """What the host's prepare_batch hands the family: clip latents, noise, sigma-mixed latents, [B] timesteps."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, frames, 4, 6, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    sigmas = torch.tensor([0.3, 0.8])[:batch]
    noisy = (1 - sigmas.view(-1, 1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1, 1) * noise
    out = {"latents": latents, "noise": noise, "noisy_latents": noisy, "timesteps": sigmas * 1000, "sigmas": sigmas}
    if with_condition:
        out["conditioning_latents"] = torch.randn(batch, 16, 1, 4, 6, generator=gen)
    return out


def test_condition_frame_is_the_start_latent_clean_at_t0_and_the_rest_untouched():
    batch = host_like_batch()
    before = {key: value.clone() for key, value in batch.items()}
    out = apply_i2v_condition(batch)
    cond = before["conditioning_latents"]
    assert out["num_cond_latents"] == 1
    assert torch.equal(out["latents"][:, :, :1], cond)
    assert torch.equal(out["noisy_latents"][:, :, :1], cond)  # not noised
    assert torch.equal(out["noisy_latents"][:, :, 1:], before["noisy_latents"][:, :, 1:])
    assert torch.equal(out["latents"][:, :, 1:], before["latents"][:, :, 1:])
    assert out["frame_timesteps"].shape == (2, 3)
    assert torch.equal(out["frame_timesteps"][:, 0], torch.zeros(2))
    assert torch.equal(out["frame_timesteps"][:, 1:], before["timesteps"].view(2, 1).expand(2, 2))
    assert torch.equal(out["timesteps"], before["timesteps"])  # the host's own [B] values stay for its bookkeeping


def test_text_to_video_batch_is_left_alone():
    batch = host_like_batch(with_condition=False)
    noisy = batch["noisy_latents"].clone()
    out = apply_i2v_condition(batch)
    assert out["num_cond_latents"] == 0 and "frame_timesteps" not in out
    assert torch.equal(out["noisy_latents"], noisy)
    tensor = torch.randn(2, 16, 3, 4, 6)
    assert drop_condition_frames(tensor, out) is tensor


def test_mismatched_start_frame_latent_is_refused_with_the_files():
    batch = host_like_batch()
    batch["conditioning_latents"] = torch.randn(2, 16, 1, 4, 8)
    batch["filepaths"] = ["clips/a.mp4", "clips/b.mp4"]
    with pytest.raises(LongCatVideoError, match=r"clips/a.mp4.*same bucket"):
        apply_i2v_condition(batch)


def _family() -> LongCatVideo:
    # The host's loss() on our family, without loading a model: it needs only these attributes.
    family = LongCatVideo.__new__(LongCatVideo)
    family.config = SimpleNamespace(
        loss_type="l2",
        diff2flow_loss=False,
        diff2flow_enabled=False,
        scheduled_sampling_reflexflow=False,
        snr_gamma=None,
    )
    family.diff2flow_bridge = None
    return family


def test_host_loss_ignores_the_condition_frame_and_scores_the_others():
    family = _family()
    batch = apply_i2v_condition(host_like_batch())
    target = family.get_prediction_target(batch)
    assert target.shape[2] == 2  # frames 1: only
    full_target = batch["noise"] - batch["latents"]
    assert torch.equal(target, full_target[:, :, 1:])

    # A prediction exactly right on the scored frames: loss 0 whatever the condition frame holds.
    exact = torch.cat([torch.full_like(full_target[:, :, :1], 1e3), full_target[:, :, 1:]], dim=2)
    loss = family.loss(batch, {"model_prediction": drop_condition_frames(exact, batch)})
    assert loss.item() == 0.0

    # An error of 0.5 on the scored frames gives MSE 0.25, however wrong the condition frame is.
    off = exact.clone()
    off[:, :, 1:] += 0.5
    assert family.loss(batch, {"model_prediction": drop_condition_frames(off, batch)}).item() == pytest.approx(0.25)
    off[:, :, :1] = -7.0
    assert family.loss(batch, {"model_prediction": drop_condition_frames(off, batch)}).item() == pytest.approx(0.25)


def test_too_short_i2v_clip_is_refused():
    batch = host_like_batch(frames=1)
    with pytest.raises(LongCatVideoError, match="latent frames after the start frame"):
        apply_i2v_condition(batch)


def test_cached_latents_are_normalised_with_the_vae_config(tiny_checkpoint):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(tiny_checkpoint), subfolder="vae")
    raw = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    scaled = _family().scale_vae_latents_for_cache(raw, vae)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(scaled, (raw - mean) / std, atol=1e-6)
    assert not torch.allclose(scaled, raw)


def test_per_sample_start_latents_are_stacked_and_mismatched_ones_named():
    batch = host_like_batch()
    per_sample = [c for c in batch["conditioning_latents"]]  # the host's list form: [C, 1, h, w] each
    batch["conditioning_latents"] = per_sample
    out = apply_i2v_condition(batch)
    assert torch.equal(out["latents"][:, :, :1], torch.stack(per_sample))
    bad = host_like_batch()
    bad["conditioning_latents"] = [torch.zeros(16, 1, 4, 6), torch.zeros(16, 1, 4, 8)]
    bad["filepaths"] = ["clips/a.mp4", "clips/b.mp4"]
    with pytest.raises(LongCatVideoError, match=r"clips/a.mp4.*share their clips' bucket size"):
        apply_i2v_condition(bad)


@pytest.mark.parametrize("dataset_type", ["video", "image", "conditioning"])
def test_training_pixels_are_in_the_range_the_pipeline_gives_the_vae(dataset_type):
    # Clips and start frames reach the VAE as the pipeline's own preprocessing hands it a start
    # image: [-1, 1]. The host's default for video families is [0, 1].
    import numpy as np
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    frame = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    transform = LongCatVideo.get_transforms(object.__new__(LongCatVideo), dataset_type)
    sample = np.stack([frame, frame]) if dataset_type == "video" else Image.fromarray(frame)
    pixels = transform(sample)
    first = pixels[0] if dataset_type == "video" else pixels
    expected = VideoProcessor(vae_scale_factor=8).preprocess(Image.fromarray(frame), height=16, width=24)[0]
    assert torch.allclose(first, expected, atol=1e-6)
    assert first.min() < -0.9 and first.max() > 0.9
