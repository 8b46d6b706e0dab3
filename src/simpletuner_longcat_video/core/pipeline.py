"""Sampling: LongCat-Video text-to-video, image-to-video and video continuation as a diffusers pipeline.

One pipeline serves the three tasks, as one checkpoint does: with ``image`` the start image is
encoded (a draw from the VAE posterior, as upstream) into the first latent frame; with ``video``
its first K pixel frames are encoded as one clip into the first (K - 1) / 4 + 1 latent frames.
Those condition frames stay fixed (timestep 0) at every step while only the later frames are
denoised, and their keys and values are computed once per video (the DiT's condition KV cache);
without either every frame starts from noise. :meth:`LongCatVideoPipeline.generate_long` chains
continuations into one long video. The maths follows the official sampler: sigmas linear from 1
to 0.001 shifted by the scheduler's shift, the DiT's output negated before the Euler step, and
"CFG-zero" guidance (the unconditional branch rescaled by ``<cond, uncond> / |uncond|^2`` per
sample). The host's validation and the user's own scripts call the same ``__call__``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.loaders.lora_pipeline import CogVideoXLoraLoaderMixin
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from tqdm.auto import tqdm

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core.checkpoint import check_checkpoint_layout
from simpletuner_longcat_video.core.text import encode_prompts
from simpletuner_longcat_video.core.transformer import CONDITION_TIMESTEP, LongCatVideoTransformer3DModel
from simpletuner_longcat_video.errors import LongCatVideoError

logger = logging.getLogger("simpletuner_longcat_video.core.pipeline")

SIGMA_MIN = 0.001


@dataclass
class LongCatVideoPipelineOutput(BaseOutput):
    """``frames``: one entry per video (PIL frames, a ``[T, H, W, 3]`` array, or latents)."""

    frames: Any


def normalize_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """VAE latents to the DiT's space: ``(z - mean) / std`` per channel (the VAE config's values)."""
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


def denormalize_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    mean, std = _latent_stats(vae, latents)
    return latents * std + mean


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def cfg_zero(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Guided prediction with the CFG-zero optimised scale, computed per sample."""
    batch = cond.shape[0]
    flat_c, flat_u = cond.reshape(batch, -1).float(), uncond.reshape(batch, -1).float()
    scale = (flat_c * flat_u).sum(dim=1) / (flat_u.pow(2).sum(dim=1) + 1e-8)
    scale = scale.view(batch, *([1] * (cond.dim() - 1))).to(cond.dtype)
    return uncond * scale + guidance_scale * (cond - uncond * scale)


def check_video_size(height: int, width: int, num_frames: int, *, where: str = "pipeline call") -> None:
    """The geometry rules of ``data``: H and W divisible by 16, and (frames - 1) % 4 == 0."""
    spec.check_size(width, height, f"{where}: width x height")
    spec.check_frames(num_frames, f"{where}: num_frames")


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> list:
    """The RGB frames (``PIL.Image``) of a video file, decoded with PyAV; the first ``max_frames`` only."""
    import av

    where = f"video file {path}"
    if not os.path.isfile(path):
        raise LongCatVideoError(
            where=where,
            value=str(path),
            rule="the video file must exist",
            fix="check the path (absolute, or relative to the current directory)",
        )
    frames = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_image())
                if max_frames is not None and len(frames) >= max_frames:
                    break
    # PyAV raises its own error family, OSError subclasses and ValueError for broken files.
    except Exception as error:
        raise LongCatVideoError(
            where=where,
            value=type(error).__name__,
            rule="must be a video file PyAV can decode",
            fix="re-encode it (ffmpeg -i <file> -c:v libx264 -pix_fmt yuv420p out.mp4) or pass its frames",
        ) from error
    return frames


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 15, crf: int = 18) -> Path:
    """Write ``[T, H, W, 3]`` uint8 frames as an H.264 mp4 (PyAV); upstream's demos write crf 18 at 15 fps."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_frames(video: Any, max_frames: int | None = None, *, where: str = "pipeline call: video") -> list:
    """A video as RGB ``PIL.Image`` frames: from a list of PIL images, a ``[T, H, W, 3]`` array
    (uint8, or float in 0..1: rounded to 8 bits, as a decoded file holds) or a video file path."""
    from PIL import Image

    if isinstance(video, (str, os.PathLike)):
        return read_video(video, max_frames)
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise LongCatVideoError(
                where=where,
                value=f"array of shape {list(video.shape)}",
                rule="a video array must be [T, H, W, 3] (RGB frames)",
                fix="stack the frames along axis 0, channels last",
            )
        data = video[:max_frames]
        if np.issubdtype(data.dtype, np.floating):
            if data.size and (data.min() < 0.0 or data.max() > 1.0):
                raise LongCatVideoError(
                    where=where,
                    value=f"values from {float(data.min()):.3g} to {float(data.max()):.3g}",
                    rule="a float video array must hold values in 0..1",
                    fix="pass uint8 frames, or scale the floats to 0..1 (e.g. (x + 1) / 2 for -1..1)",
                )
            data = (data * 255.0).round().astype(np.uint8)
        elif data.dtype != np.uint8:
            raise LongCatVideoError(
                where=where,
                value=f"array of dtype {data.dtype}",
                rule="a video array must be uint8 (0..255) or float (0..1)",
                fix="convert it with .astype(np.uint8) or scale it to float 0..1",
            )
        return [Image.fromarray(np.ascontiguousarray(frame)) for frame in data]
    if isinstance(video, (list, tuple)) and all(isinstance(frame, Image.Image) for frame in video):
        return [frame.convert("RGB") for frame in video[:max_frames]]
    raise LongCatVideoError(
        where=where,
        value=type(video).__name__,
        rule="video must be a list of PIL images, a [T, H, W, 3] numpy array or the path of a video file",
        fix="pass video=[PIL.Image, ...], video=np.stack(frames) or video='clip.mp4'",
    )


def check_condition(
    image: Any, video: Any, num_condition_frames: int | None, num_frames: int
) -> tuple[list | None, int | None]:
    """The call's condition, checked before any work: ``video``'s first K frames (as PIL) and K.

    Refuses ``image`` with ``video``, ``num_condition_frames`` without ``video``, a K that is not
    4k+1 or not below ``num_frames``, and a video with fewer than K frames.
    """
    if image is not None and video is not None:
        raise LongCatVideoError(
            where="pipeline call: image / video",
            value="both given",
            rule="a call conditions on a start image (image-to-video) or on a video's first frames "
            "(continuation), not both",
            fix="pass image= or video=, or the start image as the video's first frame with num_condition_frames=1",
        )
    if video is None:
        if num_condition_frames is not None:
            raise LongCatVideoError(
                where="pipeline call: num_condition_frames",
                value=num_condition_frames,
                rule="num_condition_frames counts frames of video=, and no video was given",
                fix="pass video=<frames or file> to continue it, or drop num_condition_frames",
            )
        return None, None
    count = spec.check_condition_frames(
        spec.DEFAULT_CONDITION_FRAMES if num_condition_frames is None else num_condition_frames,
        num_frames,
        "pipeline call: num_condition_frames",
    )
    frames = video_frames(video, count)
    if len(frames) < count:
        raise _short_video_error(len(frames), count, video)
    return frames, count


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """The pipeline's float ``[T, H, W, 3]`` 0..1 frames as uint8, rounded (as diffusers' PIL output)."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class LongCatVideoLoraLoaderMixin(CogVideoXLoraLoaderMixin):
    """diffusers' transformer-only LoRA loader (save, load, fuse); nothing in it is CogVideoX-specific.

    The host names the layers after the checkpoint subfolder of the trained model (``dit/``), so
    its checkpoint saves pass ``dit_lora_layers``; they are the transformer's layers.
    """

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str,
        transformer_lora_layers: dict | None = None,
        *args: Any,
        dit_lora_layers: dict | None = None,
        transformer_lora_adapter_metadata: dict | None = None,
        dit_lora_adapter_metadata: dict | None = None,
        **kwargs: Any,
    ) -> None:
        super().save_lora_weights(
            save_directory,
            transformer_lora_layers if transformer_lora_layers is not None else dit_lora_layers,
            *args,
            transformer_lora_adapter_metadata=transformer_lora_adapter_metadata or dit_lora_adapter_metadata,
            **kwargs,
        )


class LongCatVideoPipeline(DiffusionPipeline, LongCatVideoLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae: AutoencoderKLWan,
        transformer: LongCatVideoTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.video_processor = VideoProcessor(vae_scale_factor=spec.VAE_SPATIAL_COMPRESSION)

    @torch.no_grad()
    def encode_prompt(
        self, prompt: str | list[str], device: torch.device, max_sequence_length: int = spec.TEXT_MAX_TOKENS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, device=device, max_tokens=max_sequence_length)

    @torch.no_grad()
    def encode_image(
        self,
        image: Any,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        *,
        num_latents: int | None = None,
        sample: bool = True,
    ) -> torch.Tensor:
        """Start image(s) to normalised first-frame latents ``[B, C, 1, h, w]``.

        As upstream's ``generate_i2v`` (diffusers' ``retrieve_latents`` default), a draw from the VAE
        posterior with ``generator``; ``sample=False`` gives the posterior's mode instead. The host's
        VAE cache also stores a posterior draw for the start frames training sees, so sampling and
        training agree. ``num_latents`` draws that many latents (one per video), each image repeated
        in order, with the image encoded once.
        """
        pixels = self.video_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype).unsqueeze(2)
        count = pixels.shape[0] if num_latents is None else num_latents
        if count % pixels.shape[0]:
            raise LongCatVideoError(
                where="pipeline call: image",
                value=f"{pixels.shape[0]} start images for {count} videos",
                rule="each prompt's videos share one start image: give one image, or one per prompt",
                fix="pass image=<one image> or a list with one image per prompt",
            )
        return self._encode_pixels(pixels, count, generator, sample)

    @torch.no_grad()
    def encode_video(
        self,
        video: Any,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        *,
        num_condition_frames: int,
        num_latents: int = 1,
        sample: bool = True,
    ) -> torch.Tensor:
        """The first ``num_condition_frames`` frames of ``video`` to normalised condition latents
        ``[num_latents, C, (K - 1) / 4 + 1, h, w]``.

        The frames are resized like a start image and encoded as one clip (the VAE's causal time
        axis: frame 0 alone, then groups of 4). As upstream's ``generate_vc`` (diffusers'
        ``retrieve_latents`` default), the latents are a draw from the VAE posterior with
        ``generator``, one per video; ``sample=False`` gives the posterior's mode instead.
        """
        frames = video_frames(video, num_condition_frames)
        if len(frames) < num_condition_frames:
            raise _short_video_error(len(frames), num_condition_frames, video)
        pixels = self.video_processor.preprocess_video(frames[:num_condition_frames], height=height, width=width)
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        return self._encode_pixels(pixels, num_latents, generator, sample)

    def _encode_pixels(
        self, pixels: torch.Tensor, count: int, generator: torch.Generator | None, sample: bool
    ) -> torch.Tensor:
        # One encode per distinct input; its posterior repeated so that each of the `count` videos
        # draws its own latent, in order, from the one generator (upstream draws video by video).
        posterior = self.vae.encode(pixels).latent_dist
        if count != pixels.shape[0]:
            posterior = DiagonalGaussianDistribution(
                posterior.parameters.repeat_interleave(count // pixels.shape[0], 0)
            )
        latents = posterior.sample(generator) if sample else posterior.mode()
        return normalize_latents(latents.float(), self.vae)

    def prepare_latents(
        self,
        batch: int,
        height: int,
        width: int,
        num_frames: int,
        image: Any = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        *,
        video: Any = None,
        num_condition_frames: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The latents the first step sees, and how many leading frames are condition frames.

        Upstream's order: the noise ``[B, 16, (frames - 1) / 4 + 1, H / 8, W / 8]`` is drawn first,
        then (with ``image``) the start image's posterior draw, from the same ``generator``, replaces
        latent frame 0, or (with ``video``) the draw of its first ``num_condition_frames`` frames
        replaces the first (K - 1) / 4 + 1 latent frames. One seed thus gives the same noise with or
        without a condition.
        """
        shape = (
            batch,
            self.transformer.config.in_channels,
            spec.FRAME_RULE.latent_frames(num_frames),
            height // spec.VAE_SPATIAL_COMPRESSION,
            width // spec.VAE_SPATIAL_COMPRESSION,
        )
        device = self._execution_device
        if latents is None:
            # The host hands a CPU generator to a pipeline on the GPU: drawn where the generator
            # lives, then moved (diffusers' randn_tensor), so a seed gives the same video anywhere.
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32).clone()
        if video is not None:
            frames = num_condition_frames or spec.DEFAULT_CONDITION_FRAMES
            cond = self.encode_video(video, height, width, generator, num_condition_frames=frames, num_latents=batch)
            latents[:, :, : cond.shape[2]] = cond
            return latents, cond.shape[2]
        if image is None:
            return latents, 0
        images = image if isinstance(image, list) else [image]
        count = spec.NUM_COND_LATENTS_I2V
        latents[:, :, :count] = self.encode_image(images, height, width, generator, num_latents=batch)
        return latents, count

    def sampling_sigmas(self, num_inference_steps: int, use_distill: bool = False) -> list[float]:
        """Sigmas before the scheduler's shift: linear from 1 to 0.001, or the distillation's grid.

        The CFG/step distillation LoRA was trained on a grid of ``DISTILL_GRID_STEPS`` sigmas
        (``k / DISTILL_GRID_STEPS``, k from the top down); upstream samples it by taking every
        ``grid / steps``-th of them (index rounded down), which is what ``use_distill`` reproduces.
        """
        if not use_distill:
            return np.linspace(1.0, SIGMA_MIN, num_inference_steps).tolist()
        train_steps = int(self.scheduler.config.num_train_timesteps)
        stride = train_steps // spec.DISTILL_GRID_STEPS
        picks = np.floor(np.linspace(0, spec.DISTILL_GRID_STEPS, num_inference_steps, endpoint=False)).astype(int)
        return [float((spec.DISTILL_GRID_STEPS - pick) * stride) / train_steps for pick in picks]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        negative_prompt: str | list[str] | None = None,
        height: int = spec.DEFAULT_RESOLUTION[0],
        width: int = spec.DEFAULT_RESOLUTION[1],
        num_frames: int = spec.DEFAULT_NUM_FRAMES,
        num_inference_steps: int = spec.DEFAULT_STEPS,
        guidance_scale: float = spec.DEFAULT_GUIDANCE,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        max_sequence_length: int = spec.TEXT_MAX_TOKENS,
        show_progress: bool = True,
        use_distill: bool = False,
        video: Any = None,
        num_condition_frames: int | None = None,
        use_kv_cache: bool = True,
    ) -> LongCatVideoPipelineOutput | tuple:
        """Generate videos; ``image`` turns text-to-video into image-to-video, ``video`` into continuation.

        ``video`` (a list of PIL images, a ``[T, H, W, 3]`` uint8 or 0..1 float array, or a video
        file path) is continued from its first ``num_condition_frames`` frames (4k+1, default 13 as
        upstream; fewer than ``num_frames``): they are resized like a start image, encoded as one
        clip into (K - 1) / 4 + 1 condition latent frames, and kept fixed at every step. The
        returned video has ``num_frames`` frames, the first K of them the decoded condition latents
        (upstream's ``generate_vc``). To continue a longer clip from its end, pass its last K frames.

        ``use_kv_cache`` (image-to-video and continuation) computes the condition frames' keys and
        values once per video and runs the DiT on the noisy frames only at every step (the same
        result within float rounding; off under context parallelism, where the DiT refuses it).
        On the H200 with compiled blocks it took a CFG step from 3.98 to 3.84 s (image-to-video)
        and from 3.84 to 3.37 s (13-frame continuation), docs/continuation.md.

        ``use_distill`` samples on the distillation LoRA's sigma grid (see :meth:`sampling_sigmas`);
        with that LoRA applied, upstream uses 16 steps and guidance 1.0.

        Guidance > 1 without a negative prompt encodes the empty string as the negative (upstream's
        behaviour); its states are computed once per call. ``output_type`` is ``"np"`` (float
        ``[T, H, W, 3]`` in 0..1 per video), ``"pil"`` or ``"latent"``.
        """
        check_video_size(height, width, num_frames)
        video, num_condition_frames = check_condition(image, video, num_condition_frames, num_frames)
        device = self._execution_device
        dtype = self.transformer.dtype

        if prompt_embeds is None:
            if prompt is None:
                raise LongCatVideoError(
                    where="pipeline call", value=None, rule="needs a prompt or prompt_embeds", fix="pass prompt='...'"
                )
            prompt_embeds, prompt_attention_mask = self.encode_prompt(prompt, device, max_sequence_length)
        prompt_embeds, prompt_attention_mask = _as_batch(prompt_embeds, prompt_attention_mask, device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, 0)
        prompt_attention_mask = prompt_attention_mask.repeat_interleave(num_videos_per_prompt, 0)
        batch = prompt_embeds.shape[0]

        do_cfg = guidance_scale > 1.0
        if do_cfg:
            if negative_prompt_embeds is None:
                negatives = negative_prompt if negative_prompt is not None else ""
                negatives = [negatives] * batch if isinstance(negatives, str) else list(negatives)
                negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(
                    negatives, device, max_sequence_length
                )
            negative_prompt_embeds, negative_prompt_attention_mask = _as_batch(
                negative_prompt_embeds, negative_prompt_attention_mask, device
            )
            if negative_prompt_embeds.shape[0] != batch:
                negative_prompt_embeds = negative_prompt_embeds[:1].expand(batch, *negative_prompt_embeds.shape[1:])
                negative_prompt_attention_mask = negative_prompt_attention_mask[:1].expand(batch, -1)
            text = torch.cat([negative_prompt_embeds, prompt_embeds]).to(dtype)
            text_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])
        else:
            text, text_mask = prompt_embeds.to(dtype), prompt_attention_mask

        latent_frames = spec.FRAME_RULE.latent_frames(num_frames)
        latents, num_cond = self.prepare_latents(
            batch,
            height,
            width,
            num_frames,
            image,
            generator,
            latents,
            video=video,
            num_condition_frames=num_condition_frames,
        )
        cache = None
        cache_note = ""
        if num_cond and use_kv_cache:
            if self.transformer.context_parallel_enabled:
                cache_note = ", condition KV cache off (context parallelism)"
            else:
                # Per video, not per CFG branch: the forward repeats it for the negative and positive halves.
                cache = self.transformer.condition_cache(latents[:, :, :num_cond].to(dtype), total_frames=latent_frames)
                cache_note = ", condition KV cache"

        if video is not None:
            task = f"video continuation ({num_condition_frames} condition frames in latent frames 0-{num_cond - 1})"
        elif num_cond:
            task = "image-to-video (start image in latent frame 0)"
        else:
            task = "text-to-video"
        logger.info(
            "LongCat-Video sampling: %s, %dx%d, %d frames, %d steps%s, guidance %.2f%s%s",
            task,
            width,
            height,
            num_frames,
            num_inference_steps,
            " on the distillation grid" if use_distill else "",
            guidance_scale,
            " with CFG-zero" if do_cfg else "",
            cache_note,
        )
        self.scheduler.set_timesteps(sigmas=self.sampling_sigmas(num_inference_steps, use_distill), device=device)
        timesteps = self.scheduler.timesteps
        iterator = tqdm(timesteps, desc="LongCat-Video", disable=not show_progress)
        for index, t in enumerate(iterator):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            frame_t = t.expand(model_input.shape[0]).to(dtype).unsqueeze(1).repeat(1, latent_frames)
            frame_t[:, :num_cond] = CONDITION_TIMESTEP
            # With the cache the condition frames of model_input are not read again (a callback that
            # edits them has no effect); the output holds the cached prediction for them.
            output = self.transformer(
                hidden_states=model_input.to(dtype),
                timestep=frame_t,
                encoder_hidden_states=text,
                encoder_attention_mask=text_mask,
                num_cond_latents=num_cond,
                return_dict=False,
                condition_cache=cache,
            )[0]
            if do_cfg:
                uncond, cond_out = output.chunk(2)
                output = cfg_zero(cond_out, uncond, guidance_scale)
            velocity = -output.float()
            # Only the noisy frames take a step; the condition frames are never touched.
            latents[:, :, num_cond:] = self.scheduler.step(
                velocity[:, :, num_cond:], t, latents[:, :, num_cond:], return_dict=False
            )[0]
            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, index, t, {"latents": latents})
                latents = (returned or {}).get("latents", latents)

        if output_type == "latent":
            frames: Any = latents
        else:
            decoded = self.vae.decode(denormalize_latents(latents, self.vae).to(self.vae.dtype), return_dict=False)[0]
            frames = self.video_processor.postprocess_video(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return LongCatVideoPipelineOutput(frames=frames)

    @torch.no_grad()
    def generate_long(
        self,
        prompt: str | None = None,
        video: Any = None,
        num_condition_frames: int = spec.DEFAULT_CONDITION_FRAMES,
        num_segments: int = 2,
        *,
        negative_prompt: str | None = None,
        height: int = spec.DEFAULT_RESOLUTION[0],
        width: int = spec.DEFAULT_RESOLUTION[1],
        num_frames: int = spec.DEFAULT_NUM_FRAMES,
        num_inference_steps: int = spec.DEFAULT_STEPS,
        guidance_scale: float = spec.DEFAULT_GUIDANCE,
        generator: torch.Generator | None = None,
        use_kv_cache: bool = True,
        use_distill: bool = False,
        max_sequence_length: int = spec.TEXT_MAX_TOKENS,
        output_path: str | os.PathLike | None = None,
        fps: int = 15,
        show_progress: bool = True,
        callback_on_step_end: Callable | None = None,
    ) -> LongCatVideoPipelineOutput:
        """A long video: ``num_segments`` continuations, each conditioned on the previous one's end.

        Segment 1 continues ``video`` from its first ``num_condition_frames`` frames (as
        :meth:`__call__`); each later segment continues the last K frames of the segment before it.
        As upstream's ``run_demo_long_video.py``, those frames are taken as 8-bit pixels (the frames
        the written video holds) and encoded again, not reused as latents, and one ``generator``
        serves every segment. The prompt (and the negative) is encoded once.

        Returns ``frames``: uint8 ``[T, H, W, 3]`` with ``T = num_frames + (num_segments - 1) *
        (num_frames - K)``: segment 1 whole (its first K frames are the decoded condition), then
        every later segment without the K frames it shares with the one before. With
        ``output_path`` the video is also written there as an mp4 at ``fps`` (upstream: 15).
        ``callback_on_step_end`` is called as in :meth:`__call__`, with the step index within the
        segment. One progress bar counts the steps of all segments.
        """
        check_video_size(height, width, num_frames)
        segments = _segment_count(num_segments)
        if video is None:
            raise LongCatVideoError(
                where="generate_long: video",
                value=None,
                rule="a long video continues a video: its first segment needs video= (frames or a file)",
                fix="pass video=<frames or file>; for a start image, make one segment with image= first and "
                "pass its frames",
            )
        frames, count = check_condition(None, video, num_condition_frames, num_frames)
        if prompt is None:
            raise LongCatVideoError(where="generate_long", value=None, rule="needs a prompt", fix="pass prompt='...'")
        device = self._execution_device
        prompt_embeds, prompt_mask = self.encode_prompt(prompt, device, max_sequence_length)
        negative_embeds = negative_mask = None
        if guidance_scale > 1.0:
            negative_embeds, negative_mask = self.encode_prompt(negative_prompt or "", device, max_sequence_length)

        bar = tqdm(total=segments * num_inference_steps, desc="LongCat-Video long video", disable=not show_progress)

        def step_done(pipe: Any, index: int, t: torch.Tensor, tensors: dict) -> dict:
            bar.update(1)
            if callback_on_step_end is not None:
                return callback_on_step_end(pipe, index, t, tensors) or tensors
            return tensors

        pieces = []
        condition = frames
        try:
            for segment in range(segments):
                bar.set_postfix_str(f"segment {segment + 1}/{segments}")
                out = self(
                    prompt_embeds=prompt_embeds,
                    prompt_attention_mask=prompt_mask,
                    negative_prompt_embeds=negative_embeds,
                    negative_prompt_attention_mask=negative_mask,
                    video=condition,
                    num_condition_frames=count,
                    height=height,
                    width=width,
                    num_frames=num_frames,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=generator,
                    use_kv_cache=use_kv_cache,
                    use_distill=use_distill,
                    output_type="np",
                    show_progress=False,
                    callback_on_step_end=step_done,
                )
                decoded = to_uint8(out.frames[0])
                pieces.append(decoded if segment == 0 else decoded[count:])
                condition = decoded[-count:]
        finally:
            bar.close()
        long_video = np.concatenate(pieces)
        if output_path is not None:
            write_video(output_path, long_video, fps=fps)
            logger.info(
                "LongCat-Video long video: %d frames (%d segments) written to %s",
                len(long_video),
                segments,
                output_path,
            )
        return LongCatVideoPipelineOutput(frames=long_video)


def _segment_count(value: object) -> int:
    count = spec.whole_number(value)
    if count is None or count < 1:
        raise LongCatVideoError(
            where="generate_long: num_segments",
            value=value,
            rule="the number of generated segments must be a whole number of at least 1",
            fix="use e.g. num_segments=3 (upstream's minute-long demo chains 11 continuations)",
        )
    return count


def _short_video_error(found: int, needed: int, video: Any = None) -> LongCatVideoError:
    name = f"video file {video}" if isinstance(video, (str, os.PathLike)) else "pipeline call: video"
    return LongCatVideoError(
        where=name,
        value=f"{found} frames",
        rule=f"a video to continue must hold at least num_condition_frames = {needed} frames",
        fix=f"pass a longer video, or num_condition_frames of at most {spec.FRAME_RULE.nearest_valid_below(found)}"
        if found
        else "pass a video with frames",
    )


def _as_batch(
    states: torch.Tensor, mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states ``[B, L, C]`` and a mask ``[B, L]``; a missing mask means every token is real."""
    if states.dim() == 2:
        states = states.unsqueeze(0)
    if states.dim() == 4:
        states = states.squeeze(1)
    if mask is None:
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=device)
    elif mask.dim() == 1:
        mask = mask.unsqueeze(0)
    return states.to(device), mask.to(device)


def load_pipeline(checkpoint: str, *, torch_dtype: torch.dtype = torch.float32) -> LongCatVideoPipeline:
    """Load the official folder layout (``dit/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    check_checkpoint_layout(checkpoint)

    return LongCatVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(checkpoint, subfolder=spec.TOKENIZER_SUBFOLDER),
        text_encoder=UMT5EncoderModel.from_pretrained(
            checkpoint, subfolder=spec.TEXT_ENCODER_SUBFOLDER, torch_dtype=torch_dtype
        ),
        vae=AutoencoderKLWan.from_pretrained(checkpoint, subfolder=spec.VAE_SUBFOLDER, torch_dtype=torch.float32),
        transformer=LongCatVideoTransformer3DModel.from_pretrained(
            checkpoint, subfolder=spec.DIT_SUBFOLDER, torch_dtype=torch_dtype
        ),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint, subfolder=spec.SCHEDULER_SUBFOLDER),
    )
