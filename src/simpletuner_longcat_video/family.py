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
from simpletuner.helpers.models.common import ModelTypes, PipelineTypes, PredictionTypes, VideoModelFoundation
from transformers import AutoTokenizer, UMT5EncoderModel

from simpletuner_longcat_video import data, spec
from simpletuner_longcat_video.attention import AttentionOptions, xformers_available
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.pipeline import LongCatVideoPipeline, normalize_latents
from simpletuner_longcat_video.text import encode_prompts
from simpletuner_longcat_video.training import apply_i2v_condition, drop_condition_frames
from simpletuner_longcat_video.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel

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
    # One pipeline serves both: with a start image it is image-to-video, without one text-to-video.
    PIPELINE_CLASSES = {
        PipelineTypes.TEXT2IMG: LongCatVideoPipeline,
        PipelineTypes.IMG2VIDEO: LongCatVideoPipeline,
    }
    DEFAULT_PIPELINE_TYPE = PipelineTypes.TEXT2IMG
    DEFAULT_LORA_TARGET = list(LORA_TARGET_MODULES)
    DEFAULT_LYCORIS_TARGET = ["LongCatVideoTransformerBlock"]
    # CFG needs a negative branch; an empty prompt is encoded when the user gives none.
    VALIDATION_USES_NEGATIVE_PROMPT = True
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
        apply_flow_shift_default(self.config)
        super().setup_model_flavour()
        # The host's __init__ loads the scheduler right after this hook, so the config rules are
        # checked here, before anything is read from the checkpoint.
        check_checkpoint_layout(self.config.pretrained_model_name_or_path)
        attention_options_from_config(self.config)

    def check_user_config(self) -> None:
        super().check_user_config()
        data.check_training_config(self.config)

    # Image-to-video: start frames come from a paired conditioning dataset, VAE-encoded by the
    # host into their own cache and handed to the batch as conditioning latents.
    def _is_i2v_like_flavour(self) -> bool:
        return True

    def requires_conditioning_latents(self) -> bool:
        return True

    def supports_conditioning_dataset(self) -> bool:
        return True

    def requires_conditioning_dataset(self) -> bool:
        return False  # text-to-video datasets (no start frames) still train

    def requires_validation_i2v_samples(self) -> bool:
        return bool(getattr(self.config, "validation_using_datasets", False))

    def requires_conditioning_validation_inputs(self) -> bool:
        # Start frames given by path (validation_input, the WebUI's "Validation Input Images") must
        # take the host's sizing branch for conditioned inputs: SimpleTuner 4.10.1's validate_prompt
        # sets the output size for an input image only on that branch and otherwise fails with
        # UnboundLocalError. Without such inputs the answer stays False, so T2V validation and the
        # eval-split I2V validation keep the host's usual paths.
        return data.has_validation_start_images(self.config)

    def configure_data_signals(self, **signals: bool) -> None:
        # Called by the host's data factory once every dataset is configured and connected:
        # the last moment before training, and the first at which both file lists are known.
        super().configure_data_signals(**signals)
        data.check_datasets(self.config)

    def scale_vae_latents_for_cache(self, latents, vae):
        if torch.is_tensor(latents) and latents.dim() == 5:
            return normalize_latents(latents.float(), vae).to(latents.dtype)
        return latents

    def prepare_batch_conditions(self, batch: dict, state: dict) -> dict:
        batch = super().prepare_batch_conditions(batch=batch, state=state)
        mask = batch.get("encoder_attention_mask")
        if mask is None:
            mask = batch.get("attention_masks")
        if mask is None:
            mask = (batch.get("text_encoder_output") or {}).get("attention_masks")
        if mask is not None:
            batch["encoder_attention_mask"] = mask.to(self.accelerator.device)
        return apply_i2v_condition(batch)

    def get_prediction_target(self, prepared_batch: dict):
        return drop_condition_frames(super().get_prediction_target(prepared_batch), prepared_batch)

    def update_pipeline_call_kwargs(self, pipeline_kwargs: dict) -> dict:
        pipeline_kwargs = super().update_pipeline_call_kwargs(pipeline_kwargs)
        pipeline_kwargs["num_frames"] = data.validation_num_frames(self.config)
        pipeline_kwargs["output_type"] = "pil"
        pipeline_kwargs["show_progress"] = False
        image = pipeline_kwargs.get("image")
        if isinstance(image, list):
            pipeline_kwargs["image"] = image[0] if image else None
        return pipeline_kwargs

    def post_model_load_setup(self) -> None:
        super().post_model_load_setup()
        options = self.model.set_attention_options(attention_options_from_config(self.config))
        logger.info(
            "LongCat-Video attention: %s (block-sparse sparsity %s, chunk %s, cdf_threshold %s)",
            options.backend,
            options.sparsity,
            options.chunk,
            options.cdf_threshold,
        )

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
            timestep=prepared_batch.get("frame_timesteps", prepared_batch["timesteps"]),
            encoder_hidden_states=prepared_batch["encoder_hidden_states"].to(self.config.weight_dtype),
            encoder_attention_mask=prepared_batch.get("encoder_attention_mask"),
            num_cond_latents=num_cond_latents,
            return_dict=False,
        )[0]
        # The condition frame is input, not output: no prediction (and no loss) for it.
        return {"model_prediction": drop_condition_frames(-output, prepared_batch)}


def apply_flow_shift_default(config: object) -> None:
    """Flow matching with shift 12.0 unless the user set ``flow_schedule_shift`` themselves."""
    from simpletuner_longcat_video.plugin import HostDefault

    shift = getattr(config, "flow_schedule_shift", None)
    if shift is None or type(shift) is HostDefault:
        config.flow_schedule_shift = spec.FLOW_SHIFT
        logger.info(
            "flow_schedule_shift not set: using LongCat-Video's %.1f (set it in the config to override)",
            spec.FLOW_SHIFT,
        )


def attention_options_from_config(config: object) -> AttentionOptions:
    """The DiT's attention options from the config keys the plugin adds (spec.CONFIG_OPTIONS)."""
    defaults = {option.name: option.default for option in spec.CONFIG_OPTIONS}

    def value(name: str) -> object:
        found = getattr(config, name, None)
        return defaults[name] if found is None else found

    backend = str(value("attention_implementation"))
    if backend not in spec.ATTENTION_IMPLEMENTATIONS:
        raise LongCatVideoError(
            where="attention_implementation",
            value=backend,
            rule=f"must be one of {list(spec.ATTENTION_IMPLEMENTATIONS)}",
            fix='use "auto" unless you need to force a backend',
        )
    if backend == "xformers":
        if not xformers_available():
            raise LongCatVideoError(
                where="attention_implementation",
                value=backend,
                rule="xFormers is not installed in this environment",
                fix='pip install xformers (matching your torch build), or use "auto"',
            )
    raw_chunk = value("longcat_bsa_chunk")
    try:
        chunk = tuple(int(part) for part in str(raw_chunk).replace("x", ",").split(","))
    except ValueError:
        chunk = ()
    volume = chunk[0] * chunk[1] * chunk[2] if len(chunk) == 3 else 0
    if len(chunk) != 3 or min(chunk) < 1 or volume < 16 or volume > 256 or volume & (volume - 1):
        raise LongCatVideoError(
            where="longcat_bsa_chunk",
            value=raw_chunk,
            rule="must be three positive integers T,H,W whose product is a power of two from 16 to 256",
            fix='use the default "4,4,8" (128 tokens per block)',
        )
    sparsity = float(value("longcat_bsa_sparsity"))
    if not 0.0 <= sparsity < 1.0:
        raise LongCatVideoError(
            where="longcat_bsa_sparsity",
            value=sparsity,
            rule="must lie in [0, 1): the fraction of key blocks each query block drops",
            fix="use the default 0.875 (0.75 keeps twice as many blocks)",
        )
    threshold = getattr(config, "longcat_bsa_cdf_threshold", None)
    if threshold is not None and not 0.0 < float(threshold) <= 1.0:
        raise LongCatVideoError(
            where="longcat_bsa_cdf_threshold",
            value=threshold,
            rule="must lie in (0, 1] or be unset",
            fix="leave it unset, or use e.g. 0.9",
        )
    return AttentionOptions(
        backend=backend,
        sparsity=sparsity,
        chunk=chunk,
        cdf_threshold=None if threshold is None else float(threshold),
    )


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
