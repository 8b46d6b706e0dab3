"""The family's data rules: config-time checks and the clip <-> start-frame pairing check.

Rules (from the quickstart, decided here once):

* Frame counts in the config (``validation_num_video_frames``, a video dataset's ``num_frames`` /
  ``min_frames``) must satisfy ``(frames - 1) % 4 == 0``; a bad count is **refused** with the two
  nearest valid counts, because a silently trimmed count changes what the user asked to train or
  see. Clips in the data that are longer than ``num_frames`` are cut to it by the host, which never
  invents frames.
* Heights and widths must be divisible by 16 (VAE 8x times patch 2). Training buckets sit on the
  64 px grid through ``aspect_bucket_alignment``, which must be 64 (the host's default; its parser
  offers nothing coarser).
* An ``is_i2v`` video dataset with ``conditioning_data`` is paired with its start frames by file
  name (the same relative path and stem; the start frame is a ``.png``, e.g. ``clip.mp4`` and
  ``clip.png``; letter case counts). Any clip without a start frame and any start frame without a
  clip is named before the first training step. ``is_i2v`` on a dataset that is not a video
  dataset is refused.
* What the host would silently drop or mis-train (undecodable, empty or too-short clips, empty
  captions, images in a video dataset) is refused by ``data_files``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import PurePosixPath

from simpletuner_longcat_video import data_files, spec
from simpletuner_longcat_video.errors import LongCatVideoError, listed

logger = logging.getLogger("simpletuner_longcat_video.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The host pairs a clip with "<stem>.png" in its conditioning dataset when that dataset is of the
# first-frame kind; it pairs identical paths otherwise.
HOST_FIRST_FRAME_SUFFIX = ".png"


def _whole_number(value: object) -> int | None:
    """``value`` as an int if it is a whole number (int, integral float or digit string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value).strip()
    return int(text) if text.isdecimal() else None


def check_frames(value: object, where: str) -> int:
    frames = _whole_number(value)
    if frames is None or frames < 1:
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
        except (ValueError, OverflowError) as error:
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
    if alignment is not None and _whole_number(alignment) != spec.BUCKET_ALIGNMENT:
        raise LongCatVideoError(
            where="aspect_bucket_alignment",
            value=alignment,
            rule=f"LongCat-Video buckets must sit on the {spec.BUCKET_ALIGNMENT} px grid (the quickstart's rule: "
            "every bucket edge then divides by the 16 px the latents need)",
            fix=f'set "aspect_bucket_alignment": {spec.BUCKET_ALIGNMENT} (or leave it out: the host\'s default is 64)',
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


def _rank_files(backend: dict) -> list[str]:
    """The files the host will use from a configured dataset on this rank: its bucketed file list."""
    metadata = backend.get("metadata_backend")
    indices = getattr(metadata, "aspect_ratio_bucket_indices", None) or {}
    return [path for paths in indices.values() for path in paths]


def _file_lists(backends: dict) -> dict[str, list[str]]:
    """Dataset id -> its files, the union of every rank's share when several processes run.

    Without an eval split SimpleTuner 4.10.1 divides each dataset between the ranks at configure
    time, clips and start frames independently, so one rank's clips and start frames do not pair
    even when the folders do. The rules are about the folders, so they see every rank's share.
    """
    import torch.distributed as dist

    # Keyed by the dataset's own id: conditioning datasets are reached through their clip dataset.
    mine = {backend.get("id", backend_id): _rank_files(backend) for backend_id, backend in backends.items()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return mine
    shares: list[dict[str, list[str]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    return {key: sorted({path for share in shares for path in (share or {}).get(key, [])}) for key in mine}


def _marked_i2v(settings: dict) -> bool:
    video = settings.get("video")
    return bool(settings.get("is_i2v")) or (isinstance(video, dict) and bool(video.get("is_i2v")))


def check_datasets(config: object, backends: dict | None = None) -> None:
    """Dataset rules once the host has configured every dataset (see the module doc and ``data_files``).

    Every dataset is checked and every problem named in one error: a user fixing one problem
    per start-up of a large run would wait minutes for each.
    """
    if backends is None:
        from simpletuner.helpers.training.state_tracker import StateTracker

        backends = getattr(StateTracker, "data_backends", {}) or {}
    source = getattr(config, "data_backend_config", None) or "the data backend config"
    files = _file_lists(backends)
    problems: list[LongCatVideoError] = []
    for backend_id, backend in backends.items():
        try:
            _check_dataset(source, backend_id, backend, files, problems)
        except LongCatVideoError as error:
            problems.append(error)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise LongCatVideoError(
            where=source,
            value=f"{len(problems)} problems",
            rule="the datasets break several rules:\n"
            + "\n".join(f"  {number}. {error}" for number, error in enumerate(problems, 1)),
            fix="fix each one as its own 'Fix:' says; nothing was trained",
        )


def _check_dataset(
    source: str, backend_id: str, backend: dict, file_lists: dict[str, list[str]], problems: list[LongCatVideoError]
) -> None:
    """One dataset's rules. A problem that leaves the rest checkable goes to ``problems``; one that
    makes the rest meaningless (not a video dataset, broken pairing) is raised."""
    settings = backend.get("config") or {}
    dataset_type = backend.get("dataset_type")
    if dataset_type != "video":
        if _marked_i2v(settings):
            raise LongCatVideoError(
                where=f"{source}: dataset {backend_id!r} is_i2v",
                value=f"dataset_type {dataset_type!r}",
                rule="is_i2v marks a dataset of video clips; the host trains an image dataset as one-frame "
                "samples, which have no frames after the start frame to learn",
                fix='make it "dataset_type": "video" with clips (start images go in its conditioning dataset), '
                "or drop is_i2v to train text-to-image on the images",
            )
        return
    video = settings.get("video") if isinstance(settings.get("video"), dict) else {}
    for name in ("num_frames", "min_frames"):
        if video.get(name) is not None:
            try:
                check_frames(video[name], f"{source}: dataset {backend_id!r} video.{name}")
            except LongCatVideoError as error:
                problems.append(error)
    clip_root = settings.get("instance_data_dir")
    files = file_lists[backend.get("id", backend_id)]
    where = f"{source}: dataset {backend_id!r} ({clip_root})"
    left_out = data_files.scan_left_out(clip_root, files, video.get("min_frames"), video.get("num_frames"))
    for check, args in (
        (data_files.check_video_dataset_holds_videos, (where, clip_root, files)),
        (data_files.check_left_out, (where, left_out)),
        (data_files.check_captions, (f"{where} caption files", settings, files)),
    ):
        try:
            check(*args)
        except LongCatVideoError as error:
            problems.append(error)
    conditioning = backend.get("conditioning_data") or []
    if not video.get("is_i2v") or not conditioning:
        return
    # Clips refused above still count as present, so their start frames are not named twice.
    refused = [os.path.join(clip_root or "", name) for name in left_out.refused_names()]
    clip_keys = {pair_key(path, clip_root): path for path in [*files, *refused]}
    skipped = {pair_key(path, clip_root) for path in left_out.filtered}
    for cond in conditioning:
        _check_pair(source, backend_id, clip_root, clip_keys, cond, file_lists, skipped)


def _pairing_problems(
    clip_root: str | None, cond_root: str | None, missing: list[str], extra: list[str], skipped: set[str]
) -> list[str]:
    problems = []
    if missing:
        problems.append(f"{len(missing)} clip(s) in {clip_root} have no start frame in {cond_root}: {listed(missing)}")
    if extra:
        text = f"{len(extra)} start frame(s) in {cond_root} have no clip in {clip_root}: {listed(extra)}"
        left_out = sorted(set(extra) & skipped)
        if left_out:
            text += (
                f" (the clips {listed(left_out)} exist but the host left them out: its log says why, "
                "e.g. smaller than minimum_image_size or longer than max_frames)"
            )
        problems.append(text)
    by_case = {key.lower(): key for key in extra}
    case_only = [f"{key} vs {by_case[key.lower()]}" for key in missing if key.lower() in by_case]
    if case_only:
        problems.append(f"names that differ only in letter case ({listed(case_only)}) do not pair: the match is exact")
    return problems


def _check_pair(
    source: str,
    clip_id: str,
    clip_root: str | None,
    clip_keys: dict[str, str],
    cond: dict,
    file_lists: dict[str, list[str]],
    skipped: set[str],
) -> None:
    cond_id = cond.get("id")
    cond_settings = cond.get("config") or {}
    cond_root = cond_settings.get("instance_data_dir")
    # A conditioning dataset the host did not list on its own (unit tests build such dicts) is read here.
    frame_paths = file_lists[cond_id] if cond_id in file_lists else _rank_files(cond)
    frame_keys = {pair_key(path, cond_root): path for path in frame_paths}
    missing, extra = find_pairing_problems(clip_keys, frame_keys)
    if missing or extra:
        raise LongCatVideoError(
            where=f"{source}: datasets {clip_id!r} (is_i2v) and {cond_id!r} (conditioning)",
            value=f"{len(clip_keys)} clips, {len(frame_keys)} start frames",
            rule="every clip needs exactly one start frame with the same name (and the same sub-folder); "
            + "; ".join(_pairing_problems(clip_root, cond_root, missing, extra, skipped)),
            fix="add or rename the start frames so that clip_name.mp4 has clip_name.png beside its twin folder, "
            "or remove the unmatched files",
        )
    same_path = all(
        os.path.splitext(frame_keys[key])[1] == os.path.splitext(clip)[1] for key, clip in clip_keys.items()
    )
    if same_path:
        return  # the host pairs identical relative paths itself
    # The host looks up exactly "<clip name>.png": "clip.PNG" is not found on a case-sensitive disk
    # and the clip then trains without its start frame (measured: a warning per step, no error).
    wrong = sorted(key for key, path in frame_keys.items() if not path.endswith(HOST_FIRST_FRAME_SUFFIX))
    if wrong:
        raise LongCatVideoError(
            where=f"{source}: dataset {cond_id!r} (conditioning)",
            value=listed([os.path.basename(frame_keys[key]) for key in wrong]),
            rule="start frames paired with clips by name must be PNG files named <clip name>.png, lower-case "
            "suffix: the host looks up exactly <clip name>.png",
            fix=f"convert them, e.g. `mogrify -format png {cond_root}/*.jpg`, rename .PNG to .png, and remove the "
            "originals",
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
