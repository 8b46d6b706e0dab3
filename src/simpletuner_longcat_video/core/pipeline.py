"""Sampling: LongCat-Video text-to-video and image-to-video as a diffusers pipeline.

One pipeline serves both tasks, as one checkpoint does: with ``image`` the start image is encoded
(a draw from the VAE posterior, as upstream) into the first latent frame, which stays fixed (timestep 0) at every step while only the later
frames are denoised; without it every frame starts from noise. The maths follows the official
sampler: sigmas linear from 1 to 0.001 shifted by the scheduler's shift, the DiT's output negated
before the Euler step, and "CFG-zero" guidance (the unconditional branch rescaled by
``<cond, uncond> / |uncond|^2`` per sample). The host's validation and the user's own scripts call
the same ``__call__``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
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
from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel
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
        posterior = self.vae.encode(pixels).latent_dist
        count = pixels.shape[0] if num_latents is None else num_latents
        if count % pixels.shape[0]:
            raise LongCatVideoError(
                where="pipeline call: image",
                value=f"{pixels.shape[0]} start images for {count} videos",
                rule="each prompt's videos share one start image: give one image, or one per prompt",
                fix="pass image=<one image> or a list with one image per prompt",
            )
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
    ) -> tuple[torch.Tensor, int]:
        """The latents the first step sees, and how many leading frames are condition frames.

        Upstream's order: the noise ``[B, 16, (frames - 1) / 4 + 1, H / 8, W / 8]`` is drawn first,
        then (with ``image``) the start image's posterior draw, from the same ``generator``, replaces
        latent frame 0. One seed thus gives the same noise with or without a start image.
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
    ) -> LongCatVideoPipelineOutput | tuple:
        """Generate videos; ``image`` turns text-to-video into image-to-video.

        ``use_distill`` samples on the distillation LoRA's sigma grid (see :meth:`sampling_sigmas`);
        with that LoRA applied, upstream uses 16 steps and guidance 1.0.

        Guidance > 1 without a negative prompt encodes the empty string as the negative (upstream's
        behaviour); its states are computed once per call. ``output_type`` is ``"np"`` (float
        ``[T, H, W, 3]`` in 0..1 per video), ``"pil"`` or ``"latent"``.
        """
        check_video_size(height, width, num_frames)
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
        latents, num_cond = self.prepare_latents(batch, height, width, num_frames, image, generator, latents)

        logger.info(
            "LongCat-Video sampling: %s, %dx%d, %d frames, %d steps%s, guidance %.2f%s",
            "image-to-video (start image in latent frame 0)" if num_cond else "text-to-video",
            width,
            height,
            num_frames,
            num_inference_steps,
            " on the distillation grid" if use_distill else "",
            guidance_scale,
            " with CFG-zero" if do_cfg else "",
        )
        self.scheduler.set_timesteps(sigmas=self.sampling_sigmas(num_inference_steps, use_distill), device=device)
        timesteps = self.scheduler.timesteps
        iterator = tqdm(timesteps, desc="LongCat-Video", disable=not show_progress)
        for index, t in enumerate(iterator):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            frame_t = t.expand(model_input.shape[0]).to(dtype).unsqueeze(1).repeat(1, latent_frames)
            frame_t[:, :num_cond] = 0
            output = self.transformer(
                hidden_states=model_input.to(dtype),
                timestep=frame_t,
                encoder_hidden_states=text,
                encoder_attention_mask=text_mask,
                num_cond_latents=num_cond,
                return_dict=False,
            )[0]
            if do_cfg:
                uncond, cond_out = output.chunk(2)
                output = cfg_zero(cond_out, uncond, guidance_scale)
            velocity = -output.float()
            # Only the noisy frames take a step; the condition frame is never touched.
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
