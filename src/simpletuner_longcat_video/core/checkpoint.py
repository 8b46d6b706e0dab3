"""The official checkpoint layout, checked before any weight is read.

A local folder must hold the official sub-folders, and its ``text_encoder/`` must be umT5:
transformers loads any other encoder class (T5, CLIP, Qwen2.5-VL, ...) into ``UMT5EncoderModel``
with random weights and only logs a table, so a wrong folder would train against noise text
states. The DiT's own keys are checked from its safetensors headers before anything is cached
(``LongCatVideoTransformer3DModel.check_weight_names``) and again where they are loaded. Hub ids are left to the host's download.
Only the standard library is imported here: the family and the pipeline both call it first.
"""

from __future__ import annotations

import json
import os

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.errors import LongCatVideoError

CHECKPOINT_FOLDERS = (
    spec.DIT_SUBFOLDER,
    spec.VAE_SUBFOLDER,
    spec.TEXT_ENCODER_SUBFOLDER,
    spec.TOKENIZER_SUBFOLDER,
    spec.SCHEDULER_SUBFOLDER,
)
TEXT_ENCODER_MODEL_TYPE = "umt5"
OFFICIAL_FIX = "download the complete meituan-longcat/LongCat-Video checkpoint into that folder"


def is_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)


def check_checkpoint_layout(path: str | None) -> None:
    """A local checkpoint must have the official layout and a umT5 text encoder."""
    if not path or not is_local(path):
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
            fix=OFFICIAL_FIX,
        )
    check_text_encoder_class(os.path.join(folder, spec.TEXT_ENCODER_SUBFOLDER))


def check_text_encoder_class(folder: str) -> None:
    """``folder/config.json`` must describe a umT5 encoder (the class the official checkpoint ships)."""
    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        # Weights without a config are not a model folder either: say so here, not in transformers.
        config = {}
    except (OSError, ValueError) as error:
        raise LongCatVideoError(
            where=config_path,
            value=f"{type(error).__name__}: {error}",
            rule="the text encoder's config.json must be readable JSON",
            fix=OFFICIAL_FIX,
        ) from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != TEXT_ENCODER_MODEL_TYPE:
        architectures = config.get("architectures") if isinstance(config, dict) else None
        raise LongCatVideoError(
            where=config_path,
            value=f"model_type {model_type!r}, architectures {architectures!r}",
            rule=f"LongCat-Video's text encoder is {spec.TEXT_ENCODER_NAME} ({spec.TEXT_ENCODER_CLASS}, model_type "
            f"'{TEXT_ENCODER_MODEL_TYPE}'); another class would load with random weights",
            fix=f"put the official text_encoder/ of meituan-longcat/LongCat-Video there ({OFFICIAL_FIX})",
        )
