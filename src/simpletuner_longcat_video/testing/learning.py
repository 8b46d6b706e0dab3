"""Did the LoRA learn its clips? Sample each training pair image-to-video and compare with the clip.

For every training pair (start frame, caption, clip) the pipeline samples image-to-video from the
start frame and the caption, once without and once with the LoRA, with the same seeds; the error
is the mean squared difference between the sampled latents and the clip's own latents (the VAE's
mode, normalised as training normalises them) over the generated frames, latent frames 1: (frame
0 is the start image itself in both). A LoRA that learned its clips lowers that error by
``THRESHOLD`` times or more.

The check is deliberately the user's path: ``pipeline.load_pipeline``, the LoRA file the run
wrote, the start frame as an image file. What a wrong training batch does to it (a flipped flow
sign, a noised condition frame, a wrong timestep convention) is shown by mutation in
``tests/test_learning.py``.

The same check for video continuation (:func:`continuation_errors`): each training clip is
continued from its own first K frames (``video=``, ``num_condition_frames=K``) and compared with
the clip on the latent frames after the condition, (K - 1) / 4 + 1 onwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# The smallest improvement (error without the LoRA / error with it) that counts as learned.
THRESHOLD = 5.0
# Sampling settings of the check: few steps keep it cheap; guidance 1 measures the conditional
# model alone (no negative branch); two noise seeds per pair.
STEPS = 8
GUIDANCE = 1.0
SEEDS = (1000, 1001)


@dataclass(frozen=True)
class Pair:
    """One training pair: the start-frame image, the caption and the clip it should become."""

    start_frame: Path
    caption: str
    clip: Path


@dataclass(frozen=True)
class LearningCheck:
    """Latent errors per pair without (``before``) and with (``after``) the LoRA."""

    names: tuple[str, ...]
    before: tuple[float, ...]
    after: tuple[float, ...]
    threshold: float = THRESHOLD

    @property
    def error_before(self) -> float:
        return sum(self.before) / len(self.before)

    @property
    def error_after(self) -> float:
        return sum(self.after) / len(self.after)

    @property
    def improvement(self) -> float:
        return self.error_before / max(self.error_after, 1e-12)

    @property
    def improvements(self) -> tuple[float, ...]:
        """Per pair: error without the LoRA / error with it."""
        return tuple(before / max(after, 1e-12) for before, after in zip(self.before, self.after, strict=True))

    @property
    def passed(self) -> bool:
        return self.improvement >= self.threshold

    @property
    def every_pair_passed(self) -> bool:
        """Each clip learnt on its own (not one learnt and the other averaged away)."""
        return min(self.improvements) >= self.threshold

    def table(self) -> str:
        """A short before/after table (latent MSE on the generated frames), one row per pair."""
        rows = [f"{'pair':<14} {'without LoRA':>12} {'with LoRA':>10} {'lower by':>9}"]
        for name, before, after, ratio in zip(self.names, self.before, self.after, self.improvements, strict=True):
            rows.append(f"{name:<14} {before:>12.4f} {after:>10.4f} {ratio:>8.1f}x")
        rows.append(
            f"{'mean':<14} {self.error_before:>12.4f} {self.error_after:>10.4f} {self.improvement:>8.1f}x"
            f"  (needs >= {self.threshold:g}x: {'learned' if self.passed else 'NOT learned'})"
        )
        return "\n".join(rows)


@dataclass(frozen=True)
class Clip:
    """One continuation training clip: its caption and the clip, whose first frames are the condition."""

    caption: str
    clip: Path


def training_clips(clips: Path) -> list[Clip]:
    """The clips of a continuation dataset folder: ``<name>.mp4`` + ``<name>.txt``."""
    return [
        Clip(caption=path.with_suffix(".txt").read_text().strip(), clip=path)
        for path in sorted(Path(clips).glob("*.mp4"))
    ]


def training_pairs(clips: Path, start_frames: Path) -> list[Pair]:
    """The pairs of a paired dataset folder: ``clips/<name>.mp4`` + ``<name>.txt``, ``start_frames/<name>.png``."""
    pairs = []
    for clip in sorted(Path(clips).glob("*.mp4")):
        start = Path(start_frames) / f"{clip.stem}.png"
        pairs.append(Pair(start_frame=start, caption=clip.with_suffix(".txt").read_text().strip(), clip=clip))
    return pairs


def read_clip(path: Path) -> list:
    """The clip's frames as RGB ``PIL.Image`` objects."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


@torch.no_grad()
def clip_latents(pipe, frames: Sequence, height: int, width: int) -> torch.Tensor:
    """Normalised latents ``[1, C, T, h, w]`` of a clip, as the family caches them (mode of the posterior)."""
    from simpletuner_longcat_video.core.pipeline import normalize_latents

    pixels = pipe.video_processor.preprocess_video(list(frames), height=height, width=width)
    pixels = pixels.to(device=pipe._execution_device, dtype=pipe.vae.dtype)
    return normalize_latents(pipe.vae.encode(pixels).latent_dist.mode().float(), pipe.vae)


def _sampled_error(pipe, target: torch.Tensor, first: int, seeds: Sequence[int], **call) -> float:
    """Mean over ``seeds`` of the MSE between sampled latents and ``target`` on latent frames ``first:``."""
    per_seed = []
    for seed in seeds:
        sampled = pipe(
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            show_progress=False,
            **call,
        ).frames
        per_seed.append(float(((sampled[:, :, first:].float() - target[:, :, first:]) ** 2).mean()))
    return sum(per_seed) / len(per_seed)


@torch.no_grad()
def latent_errors(pipe, pairs: Iterable[Pair], *, steps: int = STEPS, seeds: Sequence[int] = SEEDS) -> list[float]:
    """Per pair: mean over ``seeds`` of the MSE between sampled and clip latents on frames 1:."""
    from PIL import Image

    errors = []
    for pair in pairs:
        frames = read_clip(pair.clip)
        width, height = frames[0].size
        target = clip_latents(pipe, frames, height, width)
        start = Image.open(pair.start_frame).convert("RGB")
        errors.append(
            _sampled_error(
                pipe,
                target,
                1,
                seeds,
                prompt=pair.caption,
                image=start,
                height=height,
                width=width,
                num_frames=len(frames),
                num_inference_steps=steps,
            )
        )
    return errors


@torch.no_grad()
def continuation_errors(
    pipe, clips: Iterable[Clip], condition_frames: int, *, steps: int = STEPS, seeds: Sequence[int] = SEEDS
) -> list[float]:
    """Per clip: the latent MSE of its continuation from its first ``condition_frames`` frames, after them."""
    from simpletuner_longcat_video import spec

    errors = []
    for item in clips:
        frames = read_clip(item.clip)
        width, height = frames[0].size
        target = clip_latents(pipe, frames, height, width)
        errors.append(
            _sampled_error(
                pipe,
                target,
                spec.FRAME_RULE.latent_frames(condition_frames),
                seeds,
                prompt=item.caption,
                video=frames[:condition_frames],
                num_condition_frames=condition_frames,
                height=height,
                width=width,
                num_frames=len(frames),
                num_inference_steps=steps,
            )
        )
    return errors


def learning_check(checkpoint: str | Path, lora: str | Path, pairs: Sequence[Pair], **options) -> LearningCheck:
    """Latent errors of ``pairs`` sampled from ``checkpoint`` without and with the LoRA file ``lora``."""
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    pipe = load_pipeline(str(checkpoint))
    before = latent_errors(pipe, pairs, **options)
    pipe.load_lora_weights(str(lora))
    after = latent_errors(pipe, pairs, **options)
    return LearningCheck(names=tuple(pair.clip.stem for pair in pairs), before=tuple(before), after=tuple(after))
