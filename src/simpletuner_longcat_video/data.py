"""The family's data rules: config-time checks and the clip <-> start-frame pairing check.

Rules (from the quickstart, decided here once):

* Frame counts in the config (``validation_num_video_frames``, a video dataset's ``num_frames`` /
  ``min_frames``) must satisfy ``(frames - 1) % 4 == 0``; a bad count is **refused** with the two
  nearest valid counts, because a silently trimmed count changes what the user asked to train or
  see. Clips in the data that are longer than ``num_frames`` are cut to it by the host, which never
  invents frames.
* Heights and widths must be divisible by 16 (VAE 8x times patch 2). Training buckets sit on the
  64 px grid through ``aspect_bucket_alignment``, which must be a multiple of 64 (64 by default).
* An ``is_i2v`` video dataset with ``conditioning_data`` is paired with its start frames by file
  name (the same relative path and stem; the start frame is an image, e.g. ``clip.mp4`` and
  ``clip.png``). Any clip without a start frame and any start frame without a clip is named before
  the first training step.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import PurePosixPath

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.errors import LongCatVideoError

logger = logging.getLogger("simpletuner_longcat_video.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The host pairs a clip with "<stem>.png" in its conditioning dataset when that dataset is of the
# first-frame kind; it pairs identical paths otherwise.
HOST_FIRST_FRAME_SUFFIX = ".png"
_SHOWN = 8


def check_frames(value: object, where: str) -> int:
    text = str(value).strip()
    frames = int(text) if text.isdigit() else -1
    if isinstance(value, bool) or frames < 1:
        raise LongCatVideoError(where=where, value=value, rule="must be a positive whole number", fix="use e.g. 93")
    if not spec.FRAME_RULE.is_valid(frames):
        below = spec.FRAME_RULE.nearest_valid_below(frames)
        raise LongCatVideoError(
            where=where,
            value=frames,
            rule="LongCat-Video needs (frames - 1) % 4 == 0 (the VAE keeps frame 1 and compresses the rest 4x)",
            fix=f"use {below} or {below + 4}",
        )
    return frames


def check_size(width: int, height: int, where: str, value: object = None) -> None:
    """Width and height must be positive and divisible by 16 (VAE 8x, patch 2)."""
    if width <= 0 or height <= 0 or width % spec.SIZE_MULTIPLE or height % spec.SIZE_MULTIPLE:
        grid = spec.BUCKET_ALIGNMENT
        suggestion = f"{max(grid, round(width / grid) * grid)}x{max(grid, round(height / grid) * grid)}"
        raise LongCatVideoError(
            where=where,
            value=f"{width}x{height}" if value is None else value,
            rule=f"{width}x{height}: width and height must be divisible by {spec.SIZE_MULTIPLE} (VAE 8x, patch 2)",
            fix=f"use e.g. {suggestion} (WIDTHxHEIGHT on the {grid} px grid the buckets use)",
        )


def parse_resolutions(value: object) -> list[tuple[int, int]]:
    """The host's ``validation_resolution`` forms: ``"832x480"``, ``"512"``, ``"832x480,512"`` (width x height)."""
    sizes = []
    for part in str(value).replace(" ", "").split(","):
        if not part:
            continue
        if "x" in part:
            width, height = part.lower().split("x", 1)
        else:
            width = height = part
        try:
            sizes.append((int(float(width)), int(float(height))))
        except ValueError as error:
            raise LongCatVideoError(
                where="validation_resolution",
                value=value,
                rule="must be WIDTHxHEIGHT (or one edge), comma-separated for several",
                fix='use e.g. "832x480"',
            ) from error
    return sizes


def check_training_config(config: object) -> None:
    """Config-time rules; raised from the family's ``check_user_config`` before data is read."""
    alignment = getattr(config, "aspect_bucket_alignment", None)
    if alignment is not None and (int(alignment) <= 0 or int(alignment) % spec.BUCKET_ALIGNMENT):
        raise LongCatVideoError(
            where="aspect_bucket_alignment",
            value=alignment,
            rule=f"LongCat-Video buckets must sit on the {spec.BUCKET_ALIGNMENT} px grid",
            fix=f'set "aspect_bucket_alignment": {spec.BUCKET_ALIGNMENT}',
        )
    if alignment is not None and int(alignment) != spec.BUCKET_ALIGNMENT:
        logger.warning(
            "aspect_bucket_alignment = %s: allowed (a multiple of 64) but coarser than the recommended 64",
            alignment,
        )
    resolution = getattr(config, "validation_resolution", None)
    if resolution:
        for width, height in parse_resolutions(resolution):
            check_size(width, height, "validation_resolution", resolution)
    frames = getattr(config, "validation_num_video_frames", None)
    if frames is not None:
        check_frames(frames, "validation_num_video_frames")


def validation_num_frames(config: object) -> int:
    frames = getattr(config, "validation_num_video_frames", None)
    return spec.DEFAULT_NUM_FRAMES if frames is None else check_frames(frames, "validation_num_video_frames")


def has_validation_start_images(config: object) -> bool:
    """True when the config names validation start images by path (the host's ``validation_input``).

    The host's WebUI stores that field ("Validation Input Images") as a JSON list of
    ``{"path", "prompt"}`` objects; a config file may hold the list itself.
    """
    value = getattr(config, "validation_input", None)
    if isinstance(value, str):
        value = value.strip()
        if value in ("", "None"):
            return False
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return True  # malformed: the host's own check names the option when it reads the list
    return bool(value)


def pair_key(path: str, root: str | None) -> str:
    """A file's pairing key: its path relative to the dataset folder, without the suffix."""
    relative = os.path.relpath(path, root) if root and os.path.isabs(path) else path
    return str(PurePosixPath(relative.replace(os.sep, "/")).with_suffix(""))


def find_pairing_problems(clips: Iterable[str], frames: Iterable[str]) -> tuple[list[str], list[str]]:
    """Keys of clips without a start frame, and of start frames without a clip (both sorted)."""
    clip_keys, frame_keys = set(clips), set(frames)
    return sorted(clip_keys - frame_keys), sorted(frame_keys - clip_keys)


def _files_of(backend: dict) -> list[str]:
    """The files the host will use from a configured dataset: its bucketed file list."""
    metadata = backend.get("metadata_backend")
    indices = getattr(metadata, "aspect_ratio_bucket_indices", None) or {}
    return [path for paths in indices.values() for path in paths]


def _shown(names: list[str], suffix: str = "") -> str:
    listed = ", ".join(f"{name}{suffix}" for name in names[:_SHOWN])
    return listed + (f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def check_datasets(config: object, backends: dict | None = None) -> None:
    """Dataset rules once the host has configured every dataset (frame counts, pairing)."""
    if backends is None:
        from simpletuner.helpers.training.state_tracker import StateTracker

        backends = getattr(StateTracker, "data_backends", {}) or {}
    source = getattr(config, "data_backend_config", None) or "the data backend config"
    for backend_id, backend in backends.items():
        settings = backend.get("config") or {}
        if backend.get("dataset_type") != "video":
            continue
        video = settings.get("video") or {}
        for field in ("num_frames", "min_frames"):
            if video.get(field) is not None:
                check_frames(video[field], f"{source}: dataset {backend_id!r} video.{field}")
        conditioning = backend.get("conditioning_data") or []
        if not video.get("is_i2v") or not conditioning:
            continue
        clip_root = settings.get("instance_data_dir")
        clip_keys = {pair_key(path, clip_root): path for path in _files_of(backend)}
        for cond in conditioning:
            _check_pair(source, backend_id, clip_root, clip_keys, cond)


def _check_pair(source: str, clip_id: str, clip_root: str | None, clip_keys: dict[str, str], cond: dict) -> None:
    cond_id = cond.get("id")
    cond_settings = cond.get("config") or {}
    cond_root = cond_settings.get("instance_data_dir")
    frame_paths = _files_of(cond)
    frame_keys = {pair_key(path, cond_root): path for path in frame_paths}
    missing, extra = find_pairing_problems(clip_keys, frame_keys)
    if missing or extra:
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} clip(s) in {clip_root} have no start frame in {cond_root}: {_shown(missing)}"
            )
        if extra:
            problems.append(f"{len(extra)} start frame(s) in {cond_root} have no clip in {clip_root}: {_shown(extra)}")
        raise LongCatVideoError(
            where=f"{source}: datasets {clip_id!r} (is_i2v) and {cond_id!r} (conditioning)",
            value=f"{len(clip_keys)} clips, {len(frame_keys)} start frames",
            rule="every clip needs exactly one start frame with the same name (and the same sub-folder); "
            + "; ".join(problems),
            fix="add or rename the start frames so that clip_name.mp4 has clip_name.png beside its twin folder, "
            "or remove the unmatched files",
        )
    same_path = all(
        os.path.splitext(frame_keys[key])[1] == os.path.splitext(clip)[1] for key, clip in clip_keys.items()
    )
    if same_path:
        return  # the host pairs identical relative paths itself
    wrong = sorted(key for key, path in frame_keys.items() if not path.lower().endswith(HOST_FIRST_FRAME_SUFFIX))
    if wrong:
        raise LongCatVideoError(
            where=f"{source}: dataset {cond_id!r} (conditioning)",
            value=_shown([os.path.basename(frame_keys[key]) for key in wrong]),
            rule="start frames paired with clips by name must be PNG files (<clip name>.png): the host looks "
            "up <clip name>.png",
            fix=f"convert them, e.g. `mogrify -format png {cond_root}/*.jpg`, and remove the originals",
        )
    # The host's own first-frame conditioning datasets work this way: the dataset is marked
    # "i2v_first_frame" (clip.ext -> clip.png for the lookup) and each start frame's metadata
    # names its clip (for the way back, and for the caption).
    cond_settings["conditioning_config"] = {
        **(cond_settings.get("conditioning_config") or {}),
        "type": "i2v_first_frame",
    }
    metadata_backend = cond.get("metadata_backend")
    for key, frame_path in frame_keys.items():
        metadata = metadata_backend.get_metadata_by_filepath(frame_path) if metadata_backend is not None else None
        if isinstance(metadata, dict):
            metadata["training_sample_path"] = clip_keys[key]
    logger.info(
        "I2V pairing: %d clips in %r each have their start frame in %r (matched by name)",
        len(clip_keys),
        clip_id,
        cond_id,
    )
