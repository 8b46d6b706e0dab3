"""The host-facing LongCat-Video family: the only module that speaks SimpleTuner's model API.

Registered under ``longcat_video`` through the ``simpletuner.model_families`` entry point (see
``plugin.py``). Facts come from ``spec.py``; this class only maps them onto the host's class
attributes and hooks.
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers import AutoencoderKLWan
from simpletuner.helpers.models.common import ModelTypes, PredictionTypes, VideoModelFoundation
from transformers import AutoTokenizer, UMT5EncoderModel

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.text import encode_prompts
from simpletuner_longcat_video.transformer import LongCatVideoTransformer3DModel

logger = logging.getLogger("simpletuner_longcat_video.family")


class LongCatVideo(VideoModelFoundation):
    NAME = spec.DISPLAY_NAME
    MODEL_DESCRIPTION = spec.DESCRIPTION
    ENABLED_IN_WIZARD = True
    PREDICTION_TYPE = PredictionTypes.FLOW_MATCHING
    MODEL_TYPE = ModelTypes.TRANSFORMER
    AUTOENCODER_CLASS = AutoencoderKLWan
    LATENT_CHANNEL_COUNT = spec.LATENT_CHANNELS
    DEFAULT_NOISE_SCHEDULER = "flow_matching"
    MODEL_CLASS = LongCatVideoTransformer3DModel
    MODEL_SUBFOLDER = spec.DIT_SUBFOLDER
    # Sampling pipelines arrive with the I2V family work; none is claimed before it exists.
    PIPELINE_CLASSES: dict = {}
    DEFAULT_MODEL_FLAVOUR = spec.DEFAULT_FLAVOUR
    HUGGINGFACE_PATHS = dict(spec.FLAVOURS)
    MODEL_LICENSE = "mit"
    # The official checkpoint ships umT5-XXL in text_encoder/ (not Qwen2.5-VL as the design card says).
    TEXT_ENCODER_CONFIGURATION = {
        "text_encoder": {
            "name": spec.TEXT_ENCODER_NAME,
            "tokenizer": AutoTokenizer,
            "tokenizer_subfolder": spec.TOKENIZER_SUBFOLDER,
            "model": UMT5EncoderModel,
            "subfolder": spec.TEXT_ENCODER_SUBFOLDER,
        },
    }

    @classmethod
    def adjust_video_frames(cls, num_frames: int) -> int:
        """Trim to the largest count with (frames - 1) % 4 == 0 (the host trims clips with this)."""
        return spec.FRAME_RULE.nearest_valid_below(num_frames)

    @classmethod
    def max_swappable_blocks(cls, config=None) -> int:
        return spec.NUM_BLOCKS - 1

    def setup_model_flavour(self) -> None:
        # The host checks the flavour only when it has to resolve a hub path; a local checkpoint
        # folder with a typo'd flavour would otherwise pass silently.
        flavour = getattr(self.config, "model_flavour", None) or spec.DEFAULT_FLAVOUR
        if flavour not in spec.FLAVOURS:
            raise LongCatVideoError(
                where="model_flavour",
                value=flavour,
                rule=f"LongCat-Video ({spec.FAMILY}) has the flavours {sorted(spec.FLAVOURS)}",
                fix='set "model_flavour": "final" (the same weights serve T2V and I2V)',
            )
        super().setup_model_flavour()

    def check_user_config(self) -> None:
        super().check_user_config()
        check_checkpoint_layout(self.config.pretrained_model_name_or_path)

    # Text: umT5 states plus their valid-length mask, cached by the host as a dict.
    def _encode_prompts(self, prompts: list, is_negative_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(self.tokenizers[0], self.text_encoders[0], list(prompts), device=self.accelerator.device)

    def _format_text_embedding(self, text_embedding: tuple[torch.Tensor, torch.Tensor]) -> dict:
        states, mask = text_embedding
        return {"prompt_embeds": states, "attention_masks": mask}

    def convert_text_embed_for_pipeline(self, text_embedding: dict) -> dict:
        return {
            "prompt_embeds": _batched(text_embedding["prompt_embeds"]),
            "prompt_attention_mask": _batched(text_embedding["attention_masks"]),
        }

    def convert_negative_text_embed_for_pipeline(self, text_embedding: dict) -> dict:
        return {
            "negative_prompt_embeds": _batched(text_embedding["prompt_embeds"]),
            "negative_prompt_attention_mask": _batched(text_embedding["attention_masks"]),
        }

    def model_predict(self, prepared_batch: dict) -> dict:
        """The DiT's flow prediction in the host's convention (target = noise - latents).

        The official model predicts ``latents - noise`` (its sampler negates the output before
        the Euler step), so the output is negated here once.
        """
        latents = prepared_batch["noisy_latents"].to(self.config.weight_dtype)
        num_cond_latents = int(prepared_batch.get("num_cond_latents", 0) or 0)
        output = self.model(
            hidden_states=latents,
            timestep=prepared_batch["timesteps"],
            encoder_hidden_states=prepared_batch["encoder_hidden_states"].to(self.config.weight_dtype),
            encoder_attention_mask=prepared_batch.get("encoder_attention_mask"),
            num_cond_latents=num_cond_latents,
            return_dict=False,
        )[0]
        return {"model_prediction": -output}


def _batched(tensor: torch.Tensor) -> torch.Tensor:
    # Cached embeddings are stored per sample; the pipeline wants a batch axis.
    return tensor.unsqueeze(0) if tensor.dim() in (1, 2) else tensor


CHECKPOINT_FOLDERS = (
    spec.DIT_SUBFOLDER,
    spec.VAE_SUBFOLDER,
    spec.TEXT_ENCODER_SUBFOLDER,
    spec.TOKENIZER_SUBFOLDER,
    spec.SCHEDULER_SUBFOLDER,
)


def check_checkpoint_layout(path: str | None) -> None:
    """A local checkpoint must have the official layout; hub ids are left to the host's download."""
    if not path:
        return
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
    if not looks_local:
        return
    folder = os.path.expanduser(path)
    if not os.path.isdir(folder):
        raise LongCatVideoError(
            where="pretrained_model_name_or_path",
            value=path,
            rule="a local LongCat-Video checkpoint folder must exist",
            fix="point it at the folder holding dit/, vae/, text_encoder/, tokenizer/ and scheduler/ "
            "(a download of meituan-longcat/LongCat-Video), or use the hub id meituan-longcat/LongCat-Video",
        )
    missing = [name for name in CHECKPOINT_FOLDERS if not os.path.isdir(os.path.join(folder, name))]
    if missing:
        raise LongCatVideoError(
            where=f"pretrained_model_name_or_path ({folder})",
            value=path,
            rule=f"the official layout needs the subfolders {list(CHECKPOINT_FOLDERS)}; missing: {missing}",
            fix="download the complete meituan-longcat/LongCat-Video checkpoint into that folder",
        )
