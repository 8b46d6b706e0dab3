"""Video continuation and long videos through the pipeline, on the tiny checkpoint (CPU, 32x32).

What is checked: the condition latents are a seeded posterior draw of the video's first K frames,
fixed at every step; the KV-cached sampler gives the uncached one's latents (image-to-video and
13 condition frames, with CFG); the output starts with the decoded condition; the video forms
agree; every refusal comes before any work; a long video of 3 segments has the right frames and
each seam is conditioned on the previous segment's last K frames; the CLI writes the mp4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from simpletuner_longcat_video.core import pipeline as pipeline_module
from simpletuner_longcat_video.core.pipeline import denormalize_latents, read_video, write_video
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.testing.tiny import synthetic_clip

SIZE = dict(height=32, width=32)
PROMPT = "a red square moves"
# The tiny DiT is shaped to respond strongly to the timestep; float32 rounding of a few 1e-7 per
# DiT call grows through the CFG-zero extrapolation over the steps to about 2e-6 here.
SAMPLING_RTOL = 1e-5


def clip(frames: int, index: int = 0) -> np.ndarray:
    """A moving square that also brightens frame by frame, so no two frames are alike."""
    video = synthetic_clip(index, frames=frames, height=32, width=32).astype(np.int16)
    video += (6 * np.arange(frames, dtype=np.int16))[:, None, None, None]
    return np.clip(video, 0, 255).astype(np.uint8)


def run(pipe, seed: int = 0, **kwargs):
    steps = []

    def record(_pipe, index, t, tensors):
        steps.append(tensors["latents"].clone())
        return tensors

    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "guidance_scale": 4.0, **SIZE, **kwargs}
    out = pipe(
        generator=torch.Generator().manual_seed(seed), callback_on_step_end=record, show_progress=False, **kwargs
    )
    return out.frames, steps


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def test_condition_latents_are_the_first_frames_drawn_from_the_vae_at_every_step(tiny_pipeline):
    video = clip(11)  # longer than K: only its first 5 frames condition
    _, steps = run(tiny_pipeline, video=video, num_condition_frames=5, num_frames=9, output_type="latent")
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 3, 4, 4, generator=generator)  # upstream's order: the noise first
    expected = tiny_pipeline.encode_video(video[:5], 32, 32, generator, num_condition_frames=5)
    assert expected.shape == (1, 16, 2, 4, 4) and len(steps) == 3
    for latents in steps:
        assert torch.equal(latents[:, :, :2], expected)  # exactly, at every step
    assert not torch.allclose(steps[-1][:, :, 2:], noise[:, :, 2:])  # the noisy frame was denoised
    # A draw, not the mode; and of the first frames, not of any other five.
    mode = tiny_pipeline.encode_video(video, 32, 32, num_condition_frames=5, sample=False)
    later = tiny_pipeline.encode_video(video[1:], 32, 32, num_condition_frames=5, sample=False)
    assert (expected - mode).abs().mean() > 1e-3 and (mode - later).abs().mean() > 1e-3


@pytest.mark.parametrize("task", ["i2v", "continuation-13-frames"])
def test_kv_cached_sampling_equals_uncached(tiny_pipeline, monkeypatch, task):
    if task == "i2v":
        condition = dict(image=Image.fromarray(clip(1)[0]), num_frames=9)
    else:
        condition = dict(video=clip(13), num_condition_frames=13, num_frames=17)
    model = tiny_pipeline.transformer
    caches, cached_calls = [], []
    make_cache, forward_cached = model.condition_cache, model._forward_cached
    monkeypatch.setattr(model, "condition_cache", lambda *a, **k: caches.append(1) or make_cache(*a, **k))
    monkeypatch.setattr(model, "_forward_cached", lambda *a, **k: cached_calls.append(1) or forward_cached(*a, **k))

    cached, _ = run(tiny_pipeline, output_type="latent", **condition)
    assert len(caches) == 1 and len(cached_calls) == 3  # computed once, used by every step
    uncached, _ = run(tiny_pipeline, output_type="latent", use_kv_cache=False, **condition)
    assert len(caches) == 1 and len(cached_calls) == 3
    count = 1 if task == "i2v" else 4
    assert torch.equal(cached[:, :, :count], uncached[:, :, :count])
    assert _rel(cached[:, :, count:], uncached[:, :, count:]) <= SAMPLING_RTOL


def test_under_context_parallelism_the_pipeline_samples_without_the_cache(tiny_pipeline, monkeypatch):
    # The DiT refuses the cache under context parallelism; the pipeline's default must not break
    # sampling there (the host validates under context_parallel_size), so it runs uncached.
    model = tiny_pipeline.transformer
    monkeypatch.setattr(type(model), "context_parallel_enabled", property(lambda self: True))
    monkeypatch.setattr(model, "condition_cache", lambda *a, **k: pytest.fail("cache made under context parallelism"))
    frames, steps = run(
        tiny_pipeline, video=clip(5), num_condition_frames=5, num_frames=9, output_type="latent", num_inference_steps=1
    )
    assert len(steps) == 1 and torch.isfinite(frames).all()


def test_the_video_starts_with_the_decoded_condition_frames(tiny_pipeline):
    frames, steps = run(tiny_pipeline, video=clip(5), num_condition_frames=5, num_frames=9, num_inference_steps=2)
    video = frames[0]
    assert video.shape == (9, 32, 32, 3)
    cond = denormalize_latents(steps[0][:, :, :2], tiny_pipeline.vae)
    with torch.no_grad():
        decoded = tiny_pipeline.vae.decode(cond, return_dict=False)[0]
    decoded = tiny_pipeline.video_processor.postprocess_video(decoded, output_type="np")[0]
    assert decoded.shape[0] == 5
    np.testing.assert_allclose(video[:5], decoded, atol=1e-5)
    assert np.abs(video[5:] - decoded[-1:]).max() > 1e-3  # the rest was generated


def test_video_forms_agree(tiny_pipeline, tmp_path):
    frames = clip(5)
    forms = {
        "pil": [Image.fromarray(f) for f in frames],
        "uint8": frames,
        "float": frames.astype(np.float32) / 255.0,
    }
    encoded = {
        name: tiny_pipeline.encode_video(form, 32, 32, num_condition_frames=5, sample=False)
        for name, form in forms.items()
    }
    assert torch.equal(encoded["pil"], encoded["uint8"]) and torch.equal(encoded["pil"], encoded["float"])
    path = write_video(tmp_path / "clip.mp4", frames, fps=8, crf=10)
    assert len(read_video(path, max_frames=3)) == 3  # a file is read only as far as needed
    from_file = tiny_pipeline.encode_video(str(path), 32, 32, num_condition_frames=5, sample=False)
    assert torch.equal(
        from_file, tiny_pipeline.encode_video(read_video(path), 32, 32, num_condition_frames=5, sample=False)
    )
    assert (from_file - encoded["pil"]).abs().mean() < 0.1  # the same clip, through H.264


def _not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video")
    return str(path)


REFUSALS = {
    "k-not-4k+1": (lambda tmp: dict(video=clip(13), num_condition_frames=12), r"\(frames - 1\) % 4 == 0"),
    "k-not-below-num-frames": (
        lambda tmp: dict(video=clip(9), num_condition_frames=9),
        r"condition frames must be fewer than the 9 frames",
    ),
    "short-video": (
        lambda tmp: dict(video=clip(3), num_condition_frames=5),
        r"3 frames.*at least num_condition_frames = 5 frames.*at most 1",
    ),
    "short-video-default-13": (lambda tmp: dict(video=clip(5), num_frames=17), r"num_condition_frames = 13"),
    "image-and-video": (
        lambda tmp: dict(video=clip(5), image=Image.fromarray(clip(1)[0])),
        r"image / video.*not both",
    ),
    "k-without-video": (lambda tmp: dict(num_condition_frames=5), r"no video was given"),
    "array-shape": (lambda tmp: dict(video=clip(5)[..., 0], num_condition_frames=5), r"must be \[T, H, W, 3\]"),
    "float-range": (lambda tmp: dict(video=clip(5) / 127.5 - 1.0, num_condition_frames=5), r"values in 0\.\.1"),
    "missing-file": (
        lambda tmp: dict(video=str(tmp / "nowhere.mp4"), num_condition_frames=5),
        r"nowhere\.mp4.*must exist",
    ),
    "not-a-video": (lambda tmp: dict(video=_not_a_video(tmp), num_condition_frames=5), r"notes\.mp4.*PyAV can decode"),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_bad_continuation_input_is_refused_before_any_work(tiny_pipeline, monkeypatch, tmp_path, case):
    make, message = REFUSALS[case]

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(tiny_pipeline, "encode_prompt", no_work)
    kwargs = {"num_frames": 9, **make(tmp_path)}
    with pytest.raises(LongCatVideoError, match=message):
        tiny_pipeline(prompt=PROMPT, num_inference_steps=1, show_progress=False, **SIZE, **kwargs)


def test_generate_long_refuses_before_any_work(tiny_pipeline, monkeypatch):
    monkeypatch.setattr(tiny_pipeline, "encode_prompt", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(LongCatVideoError, match=r"num_segments.*at least 1"):
        tiny_pipeline.generate_long(PROMPT, clip(5), 5, 0, num_frames=9, **SIZE)
    with pytest.raises(LongCatVideoError, match=r"first segment needs video="):
        tiny_pipeline.generate_long(PROMPT, None, 5, 2, num_frames=9, **SIZE)


class _Bar:
    """Stands in for tqdm: records the total and the updates of the bars made with a total."""

    made: list = []

    def __init__(self, iterable=None, total=None, **kwargs) -> None:
        self.iterable, self.total, self.n, self.postfix = iterable, total, 0, []
        if iterable is None:
            _Bar.made.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        self.postfix.append(text)

    def close(self) -> None:
        pass


def test_long_video_of_three_segments_chains_on_the_last_frames(tiny_pipeline, monkeypatch, tmp_path):
    encoded, first_step = [], []
    encode_video = tiny_pipeline.encode_video

    def recording(video, *args, **kwargs):
        latents = encode_video(video, *args, **kwargs)
        encoded.append((np.stack([np.asarray(f) for f in pipeline_module.video_frames(video)]), latents))
        return latents

    def on_step(_pipe, index, t, tensors):
        if index == 0:
            first_step.append(tensors["latents"][:, :, :2].clone())
        return tensors

    monkeypatch.setattr(tiny_pipeline, "encode_video", recording)
    monkeypatch.setattr(pipeline_module, "tqdm", _Bar)
    _Bar.made = []
    source = clip(7)
    out = tiny_pipeline.generate_long(
        PROMPT,
        source,
        num_condition_frames=5,
        num_segments=3,
        num_frames=13,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_path=tmp_path / "long.mp4",
        callback_on_step_end=on_step,
        **SIZE,
    )
    long_video = out.frames
    # Segment 1 whole (13 frames), then 8 new frames per later segment.
    assert long_video.shape == (13 + 2 * 8, 32, 32, 3) and long_video.dtype == np.uint8
    assert len(encoded) == 3 and len(first_step) == 3
    np.testing.assert_array_equal(encoded[0][0], source[:5])
    # Each seam: the previous segment's last 5 frames, as the long video holds them (8-bit pixels)...
    np.testing.assert_array_equal(encoded[1][0], long_video[8:13])
    np.testing.assert_array_equal(encoded[2][0], long_video[16:21])
    # ...encoded again, and those latents are the condition of the segment's sampling.
    for (_, latents), sampled in zip(encoded, first_step, strict=True):
        assert torch.equal(latents, sampled)
    # One bar over segments and steps.
    (bar,) = _Bar.made
    assert bar.total == bar.n == 3 * 2 and bar.postfix[-1] == "segment 3/3"
    written = read_video(tmp_path / "long.mp4")
    assert len(written) == 29 and written[0].size == (32, 32)


def test_cli_continues_a_video_file_into_an_mp4(tiny_checkpoint, tmp_path, capsys):
    from simpletuner_longcat_video.core import continue_video

    source = write_video(tmp_path / "in.mp4", clip(7), fps=8, crf=10)
    out = tmp_path / "out.mp4"
    argv = ["--checkpoint", str(tiny_checkpoint), "--video", str(source), "--prompt", PROMPT, "--out", str(out)]
    argv += ["--condition-frames", "5", "--segments", "2", "--frames", "9", "--steps", "1", "--from-end"]
    assert continue_video.main(argv) == 0
    assert len(read_video(out)) == 9 + 4  # segment 1 whole, segment 2 without its 5 shared frames
    assert "wrote" in capsys.readouterr().out
