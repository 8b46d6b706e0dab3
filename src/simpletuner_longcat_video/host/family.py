"""The host-facing LongCat-Video family: the ``ModelFoundation`` subclass SimpleTuner instantiates.

Registered under ``longcat_video`` through the ``simpletuner.model_families`` entry point (see
``discovery.py``). Facts come from ``spec.py`` and the config from ``settings.py`` (read once);
this class maps them onto the host's class attributes and hooks and calls ``core`` for the model,
the batch and the sampler.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from PIL import Image
from simpletuner.helpers.models.common import ModelTypes, PipelineTypes, PredictionTypes, VideoModelFoundation
from simpletuner.helpers.musubi_block_swap import MusubiBlockSwapManager
from simpletuner.helpers.training.offloaded_gradient_checkpointer import offloaded_checkpoint
from simpletuner.helpers.training.state_tracker import StateTracker
from torchvision import transforms
from transformers import AutoTokenizer, UMT5EncoderModel

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core.conditioning import (
    apply_continuation_condition,
    apply_i2v_condition,
    drop_condition_frames,
)
from simpletuner_longcat_video.core.cuda_memory import prefer_expandable_segments
from simpletuner_longcat_video.core.pipeline import LongCatVideoPipeline, normalize_latents
from simpletuner_longcat_video.core.text import encode_prompts
from simpletuner_longcat_video.core.transformer import (
    LORA_TARGET_MODULES,
    LongCatVideoTransformer3DModel,
)
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host import continuation, datasets, faults
from simpletuner_longcat_video.host.settings import (
    Settings,
    apply_flow_shift_default,
    check_checkpoint_weights,
    check_flavour,
    check_run_config,
    compile_blocks_for,
    read_settings,
    warn_fsdp_inactive,
)
from simpletuner_longcat_video.lora.formats import (
    LoraLayers,
    attach_lora,
    check_against,
    describe,
    lora_layers_to,
    read_lora_file,
)

logger = logging.getLogger("simpletuner_longcat_video.host.family")

# The DiT runs block swap and offloaded checkpointing through SimpleTuner's own implementations.
LongCatVideoTransformer3DModel.use_trainer_parts(
    block_swap_manager=MusubiBlockSwapManager, offloaded_checkpoint=offloaded_checkpoint
)


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
        # First of the family's hooks, before any weight or activation is on the GPU.
        logger.info("LongCat-Video CUDA allocator: %s", prefer_expandable_segments())
        check_flavour(self.config)
        apply_flow_shift_default(self.config)
        super().setup_model_flavour()
        # The host's __init__ loads the scheduler right after this hook, so the plugin's keys are
        # read (once) and checked here, before anything is read from the checkpoint, and then its layout.
        self.__dict__["_settings"] = read_settings(self.config)
        check_checkpoint_weights(self.config.pretrained_model_name_or_path)

    def check_user_config(self) -> None:
        super().check_user_config()
        # First: a finished run stops here, before any other rule or any weight is read.
        faults.prepare_resume(self.config, is_main_process=bool(getattr(self.accelerator, "is_main_process", True)))
        check_run_config(self.config, self.settings, self.accelerator.device)
        warn_fsdp_inactive(self.config, self.accelerator)

    @property
    def settings(self) -> Settings:
        """The plugin's config keys, read once at set-up (or at first use, for a family built without it)."""
        found = self.__dict__.get("_settings")
        if found is None:
            found = self.__dict__["_settings"] = read_settings(self.config)
        return found

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

    def validation_preserves_reference_images(self) -> bool:
        # SimpleTuner 4.10.1 otherwise re-sizes a conditioned validation by pixel area on the bucket
        # grid: 832x480 became 816x480 on the H200, another size than training's 832x480 buckets.
        # The size asked for is used as it is; update_pipeline_call_kwargs resizes the start image.
        return True

    def requires_conditioning_validation_inputs(self) -> bool:
        # Start frames given by path (validation_input, the WebUI's "Validation Input Images") must
        # take the host's sizing branch for conditioned inputs: SimpleTuner 4.10.1's validate_prompt
        # sets the output size for an input image only on that branch and otherwise fails with
        # UnboundLocalError. Without such inputs the answer stays False, so T2V validation and the
        # eval-split I2V validation keep the host's usual paths.
        return datasets.has_validation_start_images(self.config)

    def prepare_data_backend_config(self, backend_configs: list) -> list:
        # Called (patches.extend_host_data_config) once SimpleTuner has read multidatabackend.json,
        # before it configures, embeds or encodes anything: every rule the files show is checked
        # here, so a refusal costs seconds, not a built VAE cache.
        self._dataset_scans = datasets.prepare_datasets(
            self.config,
            backend_configs,
            log=self.accelerator.is_main_process,
            condition_frames=self.settings.condition_frames,
        )
        return backend_configs

    def configure_data_signals(self, **signals: bool) -> None:
        # Called by the host's data factory once every dataset is configured and connected:
        # the last moment before training, and the first at which the host's file lists are known.
        super().configure_data_signals(**signals)
        datasets.check_datasets(self.config)
        if self.accelerator.is_main_process:
            for line in datasets.describe_clip_processing(self.config, scans=getattr(self, "_dataset_scans", None)):
                logger.info("%s", line)

    def get_transforms(self, dataset_type: str = "image"):
        # The Wan VAE takes pixels in [-1, 1]: the official model was trained so, and the pipeline
        # hands it a start image so. SimpleTuner 4.10.1's video families default to ToTensor alone
        # ([0, 1]), which would train on latents of another range than sampling conditions on.
        base = super().get_transforms(dataset_type=dataset_type)
        if dataset_type == "audio":
            return base
        return transforms.Compose([base, transforms.Normalize([0.5], [0.5])])

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
        # The host draws each batch from one dataset and names it: a continuation dataset's K was
        # written into its video block by datasets.prepare_datasets.
        frames = datasets.dataset_condition_frames(StateTracker.get_data_backend_config(batch.get("data_backend_id")))
        if frames:
            return apply_continuation_condition(batch, spec.FRAME_RULE.latent_frames(frames))
        return apply_i2v_condition(batch)

    def get_prediction_target(self, prepared_batch: dict):
        return drop_condition_frames(super().get_prediction_target(prepared_batch), prepared_batch)

    def update_pipeline_call_kwargs(self, pipeline_kwargs: dict) -> dict:
        pipeline_kwargs = super().update_pipeline_call_kwargs(pipeline_kwargs)
        pipeline_kwargs["num_frames"] = datasets.validation_num_frames(self.config)
        pipeline_kwargs["output_type"] = "pil"
        pipeline_kwargs["show_progress"] = False
        image = pipeline_kwargs.get("image")
        if isinstance(image, list):
            image = pipeline_kwargs["image"] = image[0] if image else None
        self.__dict__["_continuation_call"] = None
        clip = self._continuation_clip(image)
        if clip is not None and pipeline_kwargs.get("width") and pipeline_kwargs.get("height"):
            width, height = int(pipeline_kwargs["width"]), int(pipeline_kwargs["height"])
            frames = clip.frames_at(width, height, self)
            # The pipeline VAE-encodes these frames as one clip into the condition latents; the host's
            # start image (the clip's first frame) is not used.
            del pipeline_kwargs["image"]
            pipeline_kwargs["video"] = frames[: clip.condition_frames]
            pipeline_kwargs["num_condition_frames"] = clip.condition_frames
            shortname = image.info[VALIDATION_SHORTNAME_KEY]
            self.__dict__["_continuation_call"] = (StateTracker.get_global_step(), shortname, clip, frames)
            self.__dict__.setdefault("validation_video_sizes", {})[shortname] = (width, height)
            logger.info(
                "LongCat-Video validation %s: continues %s from its first %d of %d frames (as training prepares them, "
                "at %dx%d)",
                shortname,
                clip.path,
                clip.condition_frames,
                len(frames),
                width,
                height,
            )
        elif isinstance(image, Image.Image) and pipeline_kwargs.get("width") and pipeline_kwargs.get("height"):
            pipeline_kwargs["image"] = self._save_validation_start_image(
                image, int(pipeline_kwargs["width"]), int(pipeline_kwargs["height"])
            )
        if self.settings.distill_lora is not None:
            pipeline_kwargs["num_inference_steps"] = spec.DISTILL_STEPS
            pipeline_kwargs["guidance_scale"] = spec.DISTILL_GUIDANCE
            pipeline_kwargs["use_distill"] = True
        return pipeline_kwargs

    # Validation from the eval split. SimpleTuner 4.10.1 hands I2V validation the eval clip's own first
    # frame; patches.pair_validation_start_frames routes the host's samples through this method instead.
    def pair_validation_start_frames(self, samples: list) -> list:
        """The host's validation samples, each eval clip's start image replaced by its paired start frame.

        The start frame is the one training pairs with the clip (the host's conditioning lookup) and
        is prepared by the host's own training preparation for its dataset (bucket, crop, resize), so
        validation starts from exactly the image whose latent training puts in latent frame 0. An
        eval dataset without ``conditioning_data`` keeps the clip's first frame (said once per sample).
        """
        if not getattr(self.config, "validation_using_datasets", False):
            return [_tagged(sample) for sample in samples]
        return [_with_condition_frames(sample, self) or _with_paired_start_frame(sample, self) for sample in samples]

    def _continuation_clip(self, image: Any) -> continuation.EvalClip | None:
        """The eval clip a validation start image stands for, when its sample continues a clip."""
        shortname = image.info.get(VALIDATION_SHORTNAME_KEY) if isinstance(image, Image.Image) else None
        return (self.__dict__.get("_continuation_inputs") or {}).get(shortname)

    def _save_validation_start_image(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """The start image at the generated size, saved beside the validation videos; returns it.

        Resized here (LANCZOS, as the pipeline's own preprocessing would) so the file is exactly
        the image the pipeline encodes.
        """
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        shortname = image.info.get(VALIDATION_SHORTNAME_KEY)
        if shortname:
            folder = os.path.join(self.config.output_dir, "validation_images")
            os.makedirs(folder, exist_ok=True)
            name = start_image_file_name(StateTracker.get_global_step(), shortname, width, height)
            image.convert("RGB").save(os.path.join(folder, name))
            self.__dict__.setdefault("validation_video_sizes", {})[shortname] = (width, height)
        return image

    def post_model_load_setup(self) -> None:
        super().post_model_load_setup()
        model = self.unwrap_model(model=self.model)
        blocks = int(getattr(self.config, "musubi_blocks_to_swap", 0) or 0)
        if blocks:
            device = getattr(self.config, "musubi_block_swap_device", None) or "cpu"
            model.enable_block_swap(blocks, device)
            logger.info(
                "LongCat-Video block swap: blocks %s of %d stream from %s",
                _ranges(model.swapped_blocks),
                len(model.blocks),
                device,
            )
        compiled, reason = compile_blocks_for(self.config, self.settings, self.accelerator.device)
        if compiled:
            # Compilation is lazy: the blocks are traced at their first call, after the host
            # has added the LoRA layers; the transformer logs how long that first call took.
            model.compile_blocks()
            logger.info(
                "LongCat-Video: %d DiT blocks will be torch.compile'd at the first step (%s)", len(model.blocks), reason
            )
        else:
            logger.info("LongCat-Video: DiT blocks run eager (%s)", reason)
        model.set_checkpoint_saves(self.settings.checkpoint_saves)
        if getattr(self.config, "gradient_checkpointing", False):
            logger.info(
                "LongCat-Video gradient checkpointing: longcat_checkpoint_saves %s (%s): each block keeps %s",
                self.settings.checkpoint_saves,
                self.settings.checkpoint_saves_reason,
                _SAVES_SAID[self.settings.checkpoint_saves],
            )
        options = model.set_attention_options(self.settings.attention)
        logger.info(
            "LongCat-Video attention: %s (block-sparse sparsity %s, chunk %s, cdf_threshold %s)",
            options.backend,
            options.sparsity,
            options.chunk,
            options.cdf_threshold,
        )
        if self.settings.distill_lora is not None:
            # Read and checked now, so a wrong file stops the run before training, not at the first preview.
            layers = self._distill_layers()
            logger.info(
                "LongCat-Video validation previews use the distillation LoRA %s (%s): %d steps, guidance %.1f "
                "instead of validation_num_inference_steps / validation_guidance",
                self.settings.distill_lora,
                describe(layers),
                spec.DISTILL_STEPS,
                spec.DISTILL_GUIDANCE,
            )

    def _distill_layers(self) -> LoraLayers:
        """The distillation LoRA (CPU), read once and checked against the transformer."""
        if getattr(self, "_distill_lora", None) is None:
            path = self.settings.distill_lora
            layers, _ = read_lora_file(path)
            check_against(self.unwrap_model(), layers, source=path)
            self._distill_lora = layers
        return self._distill_lora

    # Validation previews with the distillation LoRA. The host lets a family run the pipeline call
    # itself only through its multi-stage hook; here it is one stage, wrapped so the LoRA is applied
    # for exactly that call: forward hooks on top of the trained adapter, removed afterwards, so
    # nothing of it can reach training (the weights are never written).
    # Continuation validation uses the same hook to see each result: the generated video is saved
    # beside its eval clip (host.continuation.save_beside_clip).
    def supports_multistage_validation(self) -> bool:
        return (
            self.settings.distill_lora is not None
            or bool(self.__dict__.get("_continuation_inputs"))
            or super().supports_multistage_validation()
        )

    def run_multistage_validation(self, pipeline_kwargs: dict, pipeline_call: Callable[..., Any]) -> Any:
        if self.settings.distill_lora is None and not self.__dict__.get("_continuation_inputs"):
            return super().run_multistage_validation(pipeline_kwargs, pipeline_call)
        result = self._distilled_call(pipeline_kwargs, pipeline_call)
        pending = self.__dict__.get("_continuation_call")
        if pending is not None:
            # Once per sample: with EMA comparison the host samples twice, the first (the trained weights) is saved.
            self.__dict__["_continuation_call"] = None
            step, shortname, clip, truth = pending
            folder = os.path.join(self.config.output_dir, "validation_images")
            fps = float(getattr(self.config, "framerate", None) or spec.DEFAULT_FRAMERATE)
            generated = continuation.as_frames(result.frames[0])
            continuation.save_beside_clip(folder, step, shortname, generated, truth, clip, fps)
        return result

    def _distilled_call(self, pipeline_kwargs: dict, pipeline_call: Callable[..., Any]) -> Any:
        """The pipeline call, with the distillation LoRA applied for exactly that call when one is set."""
        if self.settings.distill_lora is None:
            return pipeline_call(self.pipeline, pipeline_kwargs)
        transformer = self.pipeline.transformer
        device, dtype = next(transformer.parameters()).device, self.config.weight_dtype
        cached = getattr(self, "_distill_lora_on_device", None)
        if cached is None or cached[0] != (device, dtype):
            cached = ((device, dtype), lora_layers_to(self._distill_layers(), device=device, dtype=dtype))
            self._distill_lora_on_device = cached
        with attach_lora(transformer, cached[1], source=self.settings.distill_lora):
            return pipeline_call(self.pipeline, pipeline_kwargs)

    def unload_validation_models(self) -> None:
        super().unload_validation_models()
        self._distill_lora_on_device = None

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
        self._last_batch_files = prepared_batch.get("filepaths")  # named if a later save is refused
        # The host stops on a non-finite loss right after this; the explanation (data or weights?)
        # is ours to give. The host syncs on the loss anyway, so this check adds no stall of note.
        if not bool(torch.isfinite(output).all()):
            faults.explain_non_finite_prediction(prepared_batch, self._trainable_weights())
        # The condition frame is input, not output: no prediction (and no loss) for it.
        return {"model_prediction": drop_condition_frames(-output, prepared_batch)}

    def _trainable_weights(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, param) for name, param in self.model.named_parameters() if param.requires_grad]

    def save_lora_weights(self, *args: Any, **kwargs: Any) -> Any:
        """The host's LoRA save (checkpoints and final), refused when a weight is NaN/inf."""
        save_directory = args[0] if args else kwargs.get("save_directory")
        faults.check_lora_finite(kwargs, str(save_directory), getattr(self, "_last_batch_files", None))
        # SimpleTuner 4.10.1 passes the adapter config (lora_alpha, r) with checkpoint saves but not
        # with the final save, so output_dir/pytorch_lora_weights.safetensors lost its scale; add it.
        if not any(key.endswith("lora_adapter_metadata") for key in kwargs):
            peft_config = getattr(self.unwrap_model(), "peft_config", None) or {}
            if "default" in peft_config:
                kwargs["transformer_lora_adapter_metadata"] = peft_config["default"].to_dict()
        return super().save_lora_weights(*args, **kwargs)


# What each level keeps, for the log line (core/selective_checkpoint.py defines them).
_SAVES_SAID = {
    "none": "only its input (everything recomputed in the backward)",
    "attention": "its input, self-attention output and log-sum-exp",
    "attention+proj": "its input, self-attention output and log-sum-exp, and the hidden-wide projection outputs",
    "attention+ffn": "its input, self-attention output and log-sum-exp, and the FFN matmul outputs",
}


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])


def _batched(tensor: torch.Tensor) -> torch.Tensor:
    # Cached embeddings are stored per sample; the pipeline wants a batch axis.
    return tensor.unsqueeze(0) if tensor.dim() in (1, 2) else tensor


# PIL keeps ``info`` through resize and copy, so these travel with a start image from the host's
# sample list to the pipeline call: which validation sample it belongs to and which file it is.
VALIDATION_SHORTNAME_KEY = "longcat_validation_shortname"
START_FRAME_KEY = "longcat_start_frame"


def start_image_file_name(step: int, shortname: str, width: int, height: int) -> str:
    """``step_<N>_<shortname>_<W>x<H>.start.png``: the prefix of the host's name for the video made from it."""
    return f"step_{step}_{shortname}_{width}x{height}.start.png"


def _tagged(sample: Any, start_frame: str | None = None, image: Any = None) -> Any:
    """``sample`` with its start image (``image``, else its own) tagged with the sample's shortname."""
    image = sample.conditioning if image is None else image
    if not isinstance(image, Image.Image):
        return sample
    image = image.copy()
    image.info[VALIDATION_SHORTNAME_KEY] = sample.shortname
    if start_frame is not None:
        image.info[START_FRAME_KEY] = start_frame
    return dataclasses.replace(sample, conditioning=image)


def _with_condition_frames(sample: Any, model: Any) -> Any:
    """An eval sample of a continuation dataset, its clip noted for the pipeline call; None for other samples."""
    backend_id, clip = sample.data_backend_id, sample.image_path
    if backend_id not in (getattr(StateTracker, "data_backends", None) or {}) or not clip:
        return None
    frames = datasets.dataset_condition_frames(StateTracker.get_data_backend_config(backend_id))
    if not frames:
        return None
    found = continuation.EvalClip(dataset_id=backend_id, path=clip, condition_frames=frames)
    model.__dict__.setdefault("_continuation_inputs", {})[sample.shortname] = found
    logger.info(
        "LongCat-Video validation %s: a continuation of %s from its first %d frames", sample.shortname, clip, frames
    )
    return _tagged(sample)


def _with_paired_start_frame(sample: Any, model: Any) -> Any:
    """One eval sample of the host with the start frame training pairs with its clip (see the method)."""
    from simpletuner.helpers.caching.vae import prepare_sample

    backend_id, clip = sample.data_backend_id, sample.image_path
    if backend_id not in (getattr(StateTracker, "data_backends", None) or {}) or not clip:
        return _tagged(sample)  # a start image given by path (validation_input), not an eval clip
    conditioning = StateTracker.get_conditioning_datasets(backend_id)
    if not conditioning:
        logger.info(
            "LongCat-Video validation %s: start image = the first frame of %s (dataset %r has no conditioning_data)",
            sample.shortname,
            clip,
            backend_id,
        )
        return _tagged(sample)
    # The relative path the host's training sampler hands to the same lookup.
    root = StateTracker.get_data_backend(backend_id)["metadata_backend"].instance_data_dir
    relative = clip.split(root)[-1].lstrip("/") if root else clip
    for dataset in conditioning:
        found = dataset["sampler"].get_conditioning_sample(relative)
        if found is not None:
            break
    else:
        names = [dataset["id"] for dataset in conditioning]
        raise LongCatVideoError(
            where=f"validation sample {sample.shortname} (eval clip {clip})",
            value=f"no start frame for {relative!r} in {names}",
            rule="an eval clip of an image-to-video dataset is validated from its paired start frame, as it is "
            "trained; validation does not fall back to the clip's own first frame",
            fix=f"put the start frame under the clip's name in the conditioning dataset {names[0]!r}, or remove the clip",
        )
    start_frame = found.image_path()
    image, _, _ = prepare_sample(image=found.image, data_backend_id=dataset["id"], filepath=start_frame, model=model)
    logger.info(
        "LongCat-Video validation %s: start image = %s from %r (paired with %s), %dx%d as training prepares it",
        sample.shortname,
        start_frame,
        dataset["id"],
        clip,
        *image.size,
    )
    return _tagged(sample, start_frame, image)
