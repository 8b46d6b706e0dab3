"""The family's data rules: config-time checks and the clip <-> start-frame pairing check.

Rules (from the quickstart, decided here once):

* Frame counts in the config (``validation_num_video_frames``, a video dataset's ``num_frames`` /
  ``min_frames``) must satisfy ``(frames - 1) % 4 == 0``; a bad count is **refused** with the two
  nearest valid counts, because a silently trimmed count changes what the user asked to train or
  see. Clips in the data that are longer than ``num_frames`` are cut to it by the host, which never
  invents frames.
* Heights and widths must be divisible by 16 (VAE 8x times patch 2). Training buckets sit on the
  grid of ``aspect_bucket_alignment``, which must be 16, 32 or 64 (the host also offers 8 and 24,
  whose buckets the latents cannot take). The quickstart uses 16: on the seed's 64 px grid the
  480p size 832x480 does not exist (480 / 64 = 7.5), so 480p clips would train at 832x512 while
  validation renders 832x480; that case is said once in the log.
* An ``is_i2v`` video dataset with ``conditioning_data`` is paired with its start frames by file
  name (the same relative path and stem, any image format: ``clip.mp4`` and ``clip.jpg``; letter
  case counts). Any clip without a start frame, with several, or with one of another aspect ratio,
  and any start frame without a clip is named. ``is_i2v`` on a dataset that is not a video dataset
  is refused; the seed's ``"is_i2v": true`` beside ``dataset_type`` means ``video.is_i2v``.
* What the host would silently drop or mis-train (undecodable, empty or too-short clips, empty or
  missing captions, images in a video dataset) is refused by ``dataset_files``.
* A video dataset with ``longcat_condition_frames: K`` (beside ``dataset_type``, the place the
  host's WebUI keeps an unknown dataset key, or in its ``video`` block, the place the host's
  trainer keeps one) trains video continuation from its clips' own first K frames; the config's
  ``longcat_condition_frames`` gives every video dataset without start frames and without a
  value of its own that K. K must be 4k + 1, below every clip's frame count, on a video dataset
  without start frames (:func:`check_continuation_datasets`); an eval split continues from the
  K its training datasets use.

Two passes: :func:`prepare_datasets` runs on the data backend config as soon as SimpleTuner has
read it, before it configures, embeds or encodes anything, and checks every rule the files show;
:func:`check_datasets` runs once the host has scanned every dataset, on the files it kept, and
links each start frame to its clip.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import PurePosixPath

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.errors import LongCatVideoError, listed
from simpletuner_longcat_video.host import dataset_files

logger = logging.getLogger("simpletuner_longcat_video.host.datasets")

# The host pairs a clip with "<stem>.png" in its conditioning dataset when that dataset is of the
# first-frame kind; it pairs identical paths otherwise.
HOST_FIRST_FRAME_SUFFIX = ".png"
# Under the host's cache_dir: PNG copies of start frames in other formats (dataset_files.mirror_as_png).
START_FRAMES_FOLDER = "longcat_start_frames"
# The settings that size a sample, which SimpleTuner 4.10.1 copies from a dataset to its
# conditioning datasets (factory.py, synchronize_conditioning_settings) only after both have been
# cached. Its minimum_image_size is a filter, not a size: a small start frame is scaled up to its
# clip's bucket, as the pipeline scales a start image.
RESOLUTION_SETTINGS = ("resolution", "resolution_type", "maximum_image_size", "target_downsample_size")


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
    grid = spec.whole_number(alignment) if alignment is not None else None
    if alignment is not None and grid not in spec.BUCKET_ALIGNMENTS:
        raise LongCatVideoError(
            where="aspect_bucket_alignment",
            value=alignment,
            rule=f"LongCat-Video bucket edges must divide by {spec.SIZE_MULTIPLE} (VAE 8x, patch 2): the grid must be "
            f"one of {list(spec.BUCKET_ALIGNMENTS)}",
            fix=f'set "aspect_bucket_alignment": {spec.BUCKET_ALIGNMENT} (480p clips then train at 832x480)',
        )
    resolution = getattr(config, "validation_resolution", None)
    if resolution:
        for width, height in parse_resolutions(resolution):
            spec.check_size(width, height, "validation_resolution", resolution)
            _say_off_grid(width, height, grid or 64)
    frames = getattr(config, "validation_num_video_frames", None)
    if frames is not None:
        spec.check_frames(frames, "validation_num_video_frames")


def _say_off_grid(width: int, height: int, grid: int) -> None:
    """A warning when the training buckets cannot have the validation size (e.g. 832x480 on 64 px)."""
    if width % grid == 0 and height % grid == 0:
        return
    nearest = f"{round(width / grid) * grid or grid}x{round(height / grid) * grid or grid}"
    logger.warning(
        "validation_resolution %dx%d is not on the %d px bucket grid (aspect_bucket_alignment %d): clips of that "
        "size train at about %s, not %dx%d; set aspect_bucket_alignment to %d to train at the size you validate",
        width,
        height,
        grid,
        grid,
        nearest,
        width,
        height,
        spec.BUCKET_ALIGNMENT,
    )


def validation_num_frames(config: object) -> int:
    frames = getattr(config, "validation_num_video_frames", None)
    return spec.DEFAULT_NUM_FRAMES if frames is None else spec.check_frames(frames, "validation_num_video_frames")


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


def _truthy(value: object) -> bool:
    # JSON gives booleans; the WebUI and hand-written configs sometimes give "true"/"false".
    return value.strip().lower() in ("true", "1", "yes") if isinstance(value, str) else bool(value)


def _marked_i2v(settings: dict) -> bool:
    video = settings.get("video")
    return _truthy(settings.get("is_i2v")) or (isinstance(video, dict) and _truthy(video.get("is_i2v")))


def _raise_all(source: str, problems: list[LongCatVideoError]) -> None:
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


def _not_a_video_dataset(source: str, dataset_id: object, dataset_type: object) -> LongCatVideoError:
    return LongCatVideoError(
        where=f"{source}: dataset {dataset_id!r} is_i2v",
        value=f"dataset_type {dataset_type!r}",
        rule="is_i2v marks a dataset of video clips; the host trains an image dataset as one-frame "
        "samples, which have no frames after the start frame to learn",
        fix='make it "dataset_type": "video" with clips (start images go in its conditioning dataset), '
        "or drop is_i2v to train text-to-image on the images",
    )


def _video_settings(
    source: str, dataset_id: object, dataset_type: object, settings: dict, problems: list[LongCatVideoError]
) -> dict | None:
    """A video dataset's ``video`` block with its frame counts checked; None for other datasets."""
    if dataset_type != "video":
        if _marked_i2v(settings):
            raise _not_a_video_dataset(source, dataset_id, dataset_type)
        return None
    video = settings.get("video") if isinstance(settings.get("video"), dict) else {}
    for name in ("num_frames", "min_frames"):
        if video.get(name) is not None:
            try:
                spec.check_frames(video[name], f"{source}: dataset {dataset_id!r} video.{name}")
            except LongCatVideoError as error:
                problems.append(error)
    return video


def _pairing_error(
    source: str, clip_id: object, cond_id: object, clip_count: int, frame_count: int, problems: list[str]
) -> LongCatVideoError:
    return LongCatVideoError(
        where=f"{source}: datasets {clip_id!r} (is_i2v) and {cond_id!r} (conditioning)",
        value=f"{clip_count} clips, {frame_count} start frames",
        rule="every clip needs exactly one start frame with the same name (and the same sub-folder); "
        + "; ".join(problems),
        fix="add or rename the start frames so that clip_name.mp4 has clip_name.png (or .jpg, .webp, ...) in the "
        "same sub-folder of the start-frame folder, or remove the unmatched files",
    )


def check_datasets(config: object, backends: dict | None = None) -> None:
    """Dataset rules once the host has configured every dataset (see the module doc and ``dataset_files``).

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
    _raise_all(source, problems)


def _check_dataset(
    source: str, backend_id: str, backend: dict, file_lists: dict[str, list[str]], problems: list[LongCatVideoError]
) -> None:
    """One dataset's rules. A problem that leaves the rest checkable goes to ``problems``; one that
    makes the rest meaningless (not a video dataset, broken pairing) is raised."""
    settings = backend.get("config") or {}
    video = _video_settings(source, backend_id, backend.get("dataset_type"), settings, problems)
    if video is None:
        return
    clip_root = settings.get("instance_data_dir")
    files = file_lists[backend.get("id", backend_id)]
    where = f"{source}: dataset {backend_id!r} ({clip_root})"
    left_out = dataset_files.scan_left_out(clip_root, files, video.get("min_frames"), video.get("num_frames"))
    for check, args in (
        (dataset_files.check_video_dataset_holds_videos, (where, clip_root, files)),
        (dataset_files.check_left_out, (where, left_out)),
        (dataset_files.check_captions, (f"{where} caption files", settings, files)),
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


def _same_paths(clip_keys: dict[str, str], frame_keys: dict[str, str]) -> bool:
    """Every start frame has its clip's file name, suffix included (start frames that are videos)."""
    return all(os.path.splitext(frame_keys[key])[1] == os.path.splitext(clip)[1] for key, clip in clip_keys.items())


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
        problems = _pairing_problems(clip_root, cond_root, missing, extra, skipped)
        raise _pairing_error(source, clip_id, cond_id, len(clip_keys), len(frame_keys), problems)
    if _same_paths(clip_keys, frame_keys):
        return  # the host pairs identical relative paths itself
    # The host looks up exactly "<clip name>.png": "clip.PNG" is not found on a case-sensitive disk
    # and the clip then trains without its start frame (measured: a warning per step, no error).
    # prepare_datasets hands the host PNG copies of other formats; this holds for datasets that did
    # not pass through it (a config list given to the host directly).
    wrong = sorted(key for key, path in frame_keys.items() if not path.endswith(HOST_FIRST_FRAME_SUFFIX))
    if wrong:
        suffixes = sorted({os.path.splitext(frame_keys[key])[1] for key in wrong})
        raise LongCatVideoError(
            where=f"{source}: dataset {cond_id!r} (conditioning)",
            value=listed([os.path.basename(frame_keys[key]) for key in wrong]),
            rule="start frames paired with clips by name reach SimpleTuner as <clip name>.png, lower-case suffix: "
            "its lookup tries exactly that name",
            fix="let SimpleTuner read the data backend config from its file (the plugin then hands it PNG copies), "
            "or convert them yourself, e.g. "
            + ", ".join(f"`mogrify -format png {cond_root}/*{suffix}`" for suffix in suffixes),
        )
    link_start_frames_to_clips(cond, clip_keys, frame_keys)
    logger.info(
        "I2V pairing: %d clips in %r each have their start frame in %r (matched by name)",
        len(clip_keys),
        clip_id,
        cond_id,
    )


def link_start_frames_to_clips(cond: dict, clip_keys: dict[str, str], frame_keys: dict[str, str]) -> None:
    """SimpleTuner 4.10.1: a checked pairing written into the host's configured conditioning dataset.

    The host pairs a clip with a start frame of another name only the way its own first-frame
    conditioning datasets work: the dataset is marked ``conditioning_config.type = i2v_first_frame``
    (its lookup maps ``clip.ext`` to ``clip.png``) and each start frame's metadata names its clip
    (``training_sample_path``: the way back, and the caption). A ``conditioning: [{"type": ...}]``
    entry in the dataset config cannot say this: it makes the host *generate* start frames from
    each clip's first frame, not pair the user's own. Listed in docs/plugin.md with the patches.
    """
    settings = cond.get("config") or {}
    settings["conditioning_config"] = {**(settings.get("conditioning_config") or {}), "type": "i2v_first_frame"}
    metadata_backend = cond.get("metadata_backend")
    for key, frame_path in frame_keys.items():
        metadata = metadata_backend.get_metadata_by_filepath(frame_path) if metadata_backend is not None else None
        if isinstance(metadata, dict):
            metadata["training_sample_path"] = clip_keys[key]


# --- before SimpleTuner configures anything ----------------------------------------------------


def _active(datasets: list) -> list[dict]:
    return [d for d in datasets if isinstance(d, dict) and not (d.get("disabled") or d.get("disable"))]


def _conditioning_ids(settings: dict) -> list[str]:
    value = settings.get("conditioning_data") or []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]


def _local(settings: dict) -> bool:
    return (settings.get("type") or "local") == "local"


def _aspect(size: tuple[int, int], rounding: int) -> float:
    # SimpleTuner buckets by width / height rounded to aspect_bucket_rounding (2) decimals.
    return round(size[0] / size[1], rounding)


def _rounding(config: object) -> int:
    value = spec.whole_number(getattr(config, "aspect_bucket_rounding", None))
    return 2 if value is None or value < 0 else value


def prepare_datasets(
    config: object, datasets: list, *, log: bool = True, condition_frames: int = 0
) -> dict[str, dataset_files.LeftOut]:
    """Read the data backend config as the family means it, and check every rule its files show.

    Runs when SimpleTuner 4.10.1 has read ``multidatabackend.json`` and before it configures,
    embeds or encodes anything (``patches.extend_host_data_config``), on the list the host will use,
    which is changed in place:

    * a relative ``instance_data_dir`` is made absolute (against the working directory, as the
      host reads it): the host names cache files from the relative name and the absolute file
      paths it lists, and looks start-frame latents up under another name than it wrote them;
    * the seed's ``"is_i2v": true`` beside ``dataset_type`` becomes ``video.is_i2v`` (the only
      place the host reads it), and a video dataset without ``video.num_frames`` gets 93;
    * a start-frame dataset takes its clips' resolution settings (the host copies them only after
      both datasets are cached, too late for the start frames' latents);
    * start frames that are not ``<clip name>.png`` are read from PNG copies in a folder under
      ``cache_dir`` (``dataset_files.mirror_as_png``); the user's folder is left alone;
    * each continuation dataset's K (its own, or ``condition_frames``, the config's
      ``longcat_condition_frames``) is written into its ``video`` block, where the family reads it
      for each batch (:func:`dataset_condition_frames`); other datasets hold none.

    Every problem found is named in one error. Returns each local video dataset's scan (its clips'
    frame counts, sizes and frame rates) for the log once the host has bucketed them.
    """
    source = getattr(config, "data_backend_config", None) or "the data backend config"
    active = _active(datasets)
    # An id that is no string is the host's to refuse (it checks ids when it configures).
    by_id = {settings["id"]: settings for settings in active if isinstance(settings.get("id"), str)}
    problems: list[LongCatVideoError] = []
    notes: list[str] = []
    _normalise(source, active, by_id, problems, notes)
    plan = _continuation_plan(config, active, condition_frames, problems, notes)
    for settings in active:
        if isinstance(settings.get("video"), dict):
            settings["video"].pop(spec.CONDITION_FRAMES_KEY, None)
            if settings.get("id") in plan:
                settings["video"][spec.CONDITION_FRAMES_KEY] = plan[settings["id"]]
    scans: dict[str, dataset_files.LeftOut] = {}
    conversions: dict[str, dict[str, str]] = {}
    for settings in active:
        try:
            _check_dataset_files(source, settings, by_id, _rounding(config), scans, conversions, problems)
        except LongCatVideoError as error:
            problems.append(error)
    _raise_all(source, problems)
    cache_root = getattr(config, "cache_dir", None) or os.path.join(getattr(config, "output_dir", None) or ".", "cache")
    for cond_id, frames in conversions.items():
        cond = by_id[cond_id]
        folder = os.path.abspath(os.path.join(cache_root, START_FRAMES_FOLDER, str(cond_id).replace(os.sep, "_")))
        written = dataset_files.mirror_as_png(frames, folder)
        kinds = Counter(os.path.splitext(path)[1] for path in frames.values())
        notes.append(
            f"start frames of dataset {cond_id!r} ({', '.join(f'{n} {s}' for s, n in sorted(kinds.items()))}) are "
            f"read from PNG copies in {folder} ({written} of {len(frames)} written now, the rest were up to date): "
            f"SimpleTuner looks a start frame up as <clip name>.png; {cond.get('instance_data_dir')} is not changed"
        )
        cond["instance_data_dir"] = folder
    if log:
        for note in notes:
            logger.info("LongCat-Video datasets: %s", note)
    return scans


def _normalise(
    source: str, active: list[dict], by_id: dict, problems: list[LongCatVideoError], notes: list[str]
) -> None:
    relative = []
    for settings in active:
        root = settings.get("instance_data_dir")
        if _local(settings) and isinstance(root, str) and root and not os.path.isabs(root):
            settings["instance_data_dir"] = os.path.abspath(root)
            relative.append(settings.get("id"))
        if settings.get("dataset_type") != "video" or not isinstance(settings.get("video", {}), dict):
            continue
        video = settings.setdefault("video", {})
        if "is_i2v" in settings:
            top = _truthy(settings.pop("is_i2v"))
            if "is_i2v" in video and _truthy(video["is_i2v"]) != top:
                problems.append(
                    LongCatVideoError(
                        where=f"{source}: dataset {settings.get('id')!r} is_i2v",
                        value=f"{top} beside dataset_type, {video['is_i2v']} in video",
                        rule="the two is_i2v settings disagree",
                        fix='keep one: "video": {"is_i2v": true, ...} (the seed\'s top-level is_i2v means the same)',
                    )
                )
                continue
            video["is_i2v"] = top
            notes.append(
                f"dataset {settings.get('id')!r}: is_i2v beside dataset_type read as video.is_i2v = {json.dumps(top)}"
            )
        if spec.CONDITION_FRAMES_KEY in settings:
            # Beside dataset_type is where the WebUI keeps it; the host's trainer keeps it only in video.
            value = settings.pop(spec.CONDITION_FRAMES_KEY)
            video.setdefault(spec.CONDITION_FRAMES_KEY, value)
            if spec.whole_number(video[spec.CONDITION_FRAMES_KEY]) != spec.whole_number(value):
                problems.append(_two_condition_frames(source, settings.get("id"), value, video))
        if video.get("num_frames") is None:
            video["num_frames"] = spec.DEFAULT_NUM_FRAMES
            notes.append(f"dataset {settings.get('id')!r}: video.num_frames not set, using LongCat-Video's 93")
    if relative:
        notes.append(
            f"relative instance_data_dir of {listed(relative)} read from {os.getcwd()} (made absolute: SimpleTuner "
            "4.10.1 would otherwise look start-frame latents up under another name than it wrote them)"
        )
    _share_resolution_settings(source, active, by_id, problems, notes)


def _share_resolution_settings(
    source: str, active: list[dict], by_id: dict, problems: list[LongCatVideoError], notes: list[str]
) -> None:
    owner: dict[str, str] = {}
    for settings in active:
        if settings.get("dataset_type") != "video":
            continue
        for cond_id in _conditioning_ids(settings):
            cond = by_id.get(cond_id)
            if cond is None:
                continue
            for key in RESOLUTION_SETTINGS:
                if key not in settings or cond.get(key) == settings[key]:
                    continue
                if (cond_id, key) in owner:
                    problems.append(
                        LongCatVideoError(
                            where=f"{source}: dataset {cond_id!r} (conditioning) {key}",
                            value=f"{owner[cond_id, key]!r} and {settings.get('id')!r} disagree",
                            rule="a start-frame dataset takes its clips' resolution settings, so the clip datasets "
                            "it serves must agree on them",
                            fix="give each clip dataset its own start-frame dataset, or the same resolution settings",
                        )
                    )
                    continue
                if key in cond:
                    notes.append(f"dataset {cond_id!r}: {key} {cond[key]!r} -> {settings[key]!r} (from its clips)")
                cond[key] = settings[key]
                owner[cond_id, key] = settings.get("id")


def _check_dataset_files(
    source: str,
    settings: dict,
    by_id: dict,
    rounding: int,
    scans: dict[str, dataset_files.LeftOut],
    conversions: dict[str, dict[str, str]],
    problems: list[LongCatVideoError],
) -> None:
    """One dataset's rules from its files (a problem that leaves the rest checkable goes to ``problems``)."""
    dataset_id = settings.get("id")
    video = _video_settings(source, dataset_id, settings.get("dataset_type"), settings, problems)
    if video is None:
        return
    root = settings.get("instance_data_dir")
    if not _local(settings) or not isinstance(root, str):
        return  # files elsewhere (S3, Hugging Face), or no folder: the host's checks and the second pass
    where = f"{source}: dataset {dataset_id!r} ({root})"
    scan = dataset_files.scan_left_out(root, [], video.get("min_frames"), video.get("num_frames"))
    if isinstance(dataset_id, str):
        scans[dataset_id] = scan
    clips = sorted(scan.infos)
    images = dataset_files.files_on_disk(root, dataset_files.image_suffixes())
    for check, args, kwargs in (
        (dataset_files.check_video_dataset_holds_videos, (where, root, clips + images), {}),
        (dataset_files.check_left_out, (where, scan), {}),
        (dataset_files.check_captions, (f"{where} caption files", settings, clips), {"missing_too": True}),
    ):
        try:
            check(*args, **kwargs)
        except LongCatVideoError as error:
            problems.append(error)
    if not _truthy(video.get("is_i2v")):
        return
    clip_keys = {pair_key(path, root): path for path in clips}
    crops_square = _truthy(settings.get("crop")) and settings.get("crop_aspect") == "square"
    for cond_id in _conditioning_ids(settings):
        try:
            frames = _paired_files(source, dataset_id, root, clip_keys, by_id, cond_id)
            if frames is None:
                continue
            if not crops_square:
                _check_aspects(source, dataset_id, root, clip_keys, scan.infos, cond_id, frames, rounding)
            if not _same_paths(clip_keys, frames) and not all(
                path.endswith(HOST_FIRST_FRAME_SUFFIX) for path in frames.values()
            ):
                conversions[cond_id] = frames
        except LongCatVideoError as error:
            problems.append(error)


def _paired_files(
    source: str, clip_id: object, clip_root: str, clip_keys: dict[str, str], by_id: dict, cond_id: str
) -> dict[str, str] | None:
    """Pairing key -> start-frame file of a conditioning dataset, refused unless every clip has exactly one."""
    cond = by_id.get(cond_id)
    if cond is None:
        raise LongCatVideoError(
            where=f"{source}: dataset {clip_id!r} conditioning_data",
            value=cond_id,
            rule="names no dataset of this config",
            fix='use the id of the start-frame dataset, e.g. "conditioning_data": ["longcat-video-cond"]',
        )
    cond_root = cond.get("instance_data_dir")
    if not _local(cond) or not isinstance(cond_root, str):
        return None
    found = dataset_files.files_on_disk(cond_root, dataset_files.image_suffixes() | dataset_files.video_suffixes())
    by_key: dict[str, list[str]] = defaultdict(list)
    for path in found:
        by_key[pair_key(path, cond_root)].append(path)
    frames = {key: paths[0] for key, paths in by_key.items()}
    missing, extra = find_pairing_problems(clip_keys, frames)
    problems = _pairing_problems(clip_root, cond_root, missing, extra, set())
    several = sorted(key for key, paths in by_key.items() if len(paths) > 1 and key in clip_keys)
    if several:
        named = [" and ".join(os.path.basename(path) for path in by_key[key]) for key in several]
        problems.append(f"{len(several)} clip(s) have several start frames: {listed(named)}")
    if problems:
        raise _pairing_error(source, clip_id, cond_id, len(clip_keys), len(frames), problems)
    return frames


def _check_aspects(
    source: str,
    clip_id: object,
    clip_root: str,
    clip_keys: dict[str, str],
    infos: dict[str, dataset_files.ClipInfo],
    cond_id: str,
    frames: dict[str, str],
    rounding: int,
) -> None:
    """Each start frame has its clip's aspect ratio, so both land in the same bucket."""
    unreadable, other = [], []
    for key, clip in sorted(clip_keys.items()):
        info = infos.get(clip)
        if info is None or info.problem:
            continue  # refused as a clip already
        size = dataset_files.image_size(frames[key])
        if isinstance(size, str):
            unreadable.append(f"{os.path.basename(frames[key])} {size}")
            continue
        clip_size = (info.width, info.height)
        if _aspect(size, rounding) != _aspect(clip_size, rounding):
            other.append(
                f"{os.path.basename(frames[key])} is {size[0]}x{size[1]} (aspect {_aspect(size, rounding)}), "
                f"{os.path.relpath(clip, clip_root)} is {clip_size[0]}x{clip_size[1]} (aspect {_aspect(clip_size, rounding)})"
            )
    if unreadable:
        raise LongCatVideoError(
            where=f"{source}: dataset {cond_id!r} (conditioning)",
            value=listed(unreadable),
            rule="a start frame must be an image file Pillow can read (PNG, JPEG, WEBP, BMP, ...) or a video",
            fix="re-save or replace these files",
        )
    if other:
        raise LongCatVideoError(
            where=f"{source}: datasets {clip_id!r} (is_i2v) and {cond_id!r} (conditioning)",
            value=listed(other, limit=4),
            rule=f"a start frame must have its clip's aspect ratio (width / height to {rounding} decimals, as "
            "SimpleTuner buckets them): in another bucket its latent has another size than the clip's, and the run "
            "would stop at its first batch",
            fix="crop or pad each start frame to its clip's aspect ratio (or save the clip's own first frame, e.g. "
            "`ffmpeg -i clip.mp4 -frames:v 1 clip.png`)",
        )


# --- video continuation -------------------------------------------------------------------------


def read_data_backend_list(config: object) -> list | None:
    """The dataset list of ``data_backend_config`` when it is a readable JSON file, else None (the host's to read)."""
    path = getattr(config, "data_backend_config", None)
    if not isinstance(path, str) or not path.lower().endswith(".json") or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, list) else None


def check_continuation_datasets(config: object, datasets: list, condition_frames: int = 0) -> dict[str, int]:
    """The continuation rules that need no file, on the dataset list as written; dataset id -> K.

    ``simpletuner train`` runs them before it launches anything (``settings.check_config_before_launch``),
    :func:`prepare_datasets` again in the trainer; every problem is named in one error.
    """
    source = getattr(config, "data_backend_config", None) or "the data backend config"
    problems: list[LongCatVideoError] = []
    plan = _continuation_plan(config, _active(datasets), condition_frames, problems, [])
    _raise_all(source, problems)
    return plan


def condition_frames_value(value: object, where: str) -> int:
    """A ``longcat_condition_frames`` value: 0 (no continuation) or K pixel frames with (K - 1) % 4 == 0."""
    frames = spec.whole_number(value)
    if frames is None or frames < 0:
        raise LongCatVideoError(
            where=where,
            value=value,
            rule="the continuation condition is a whole number of pixel frames (0 turns continuation off)",
            fix="use e.g. 13 (upstream's video continuation), 1, 5 or 9",
        )
    # K frames encode to (K - 1) / 4 + 1 latent frames: the clip frame rule, with its message.
    return spec.check_frames(frames, where) if frames else 0


def dataset_condition_frames(backend_config: dict | None) -> int:
    """A configured dataset's continuation K (0: not a continuation dataset), as prepare_datasets wrote it."""
    video = (backend_config or {}).get("video")
    return int(spec.whole_number(video.get(spec.CONDITION_FRAMES_KEY)) or 0) if isinstance(video, dict) else 0


def _own_condition_frames(settings: dict) -> tuple[object, str] | None:
    """The dataset's own longcat_condition_frames (raw) and how it is written, or None."""
    video = settings.get("video") if isinstance(settings.get("video"), dict) else {}
    if spec.CONDITION_FRAMES_KEY in video:
        return video[spec.CONDITION_FRAMES_KEY], f"video.{spec.CONDITION_FRAMES_KEY}"
    if spec.CONDITION_FRAMES_KEY in settings:
        return settings[spec.CONDITION_FRAMES_KEY], spec.CONDITION_FRAMES_KEY
    return None


def _two_condition_frames(source: str, dataset_id: object, top: object, video: dict) -> LongCatVideoError:
    return LongCatVideoError(
        where=f"{source}: dataset {dataset_id!r} {spec.CONDITION_FRAMES_KEY}",
        value=f"{top!r} beside dataset_type, {video[spec.CONDITION_FRAMES_KEY]!r} in video",
        rule="the two longcat_condition_frames settings disagree",
        fix=f'keep one: "{spec.CONDITION_FRAMES_KEY}": 13 beside dataset_type (the form the WebUI keeps)',
    )


def _continuation_plan(
    config: object, active: list[dict], condition_frames: int, problems: list[LongCatVideoError], notes: list[str]
) -> dict[str, int]:
    """Dataset id -> K for every continuation dataset; a broken rule goes to ``problems``."""
    source = getattr(config, "data_backend_config", None) or "the data backend config"
    plan: dict[str, int] = {}
    for settings in active:
        dataset_id, dataset_type = settings.get("id"), settings.get("dataset_type")
        own = _own_condition_frames(settings)
        if own is None and not condition_frames:
            continue
        where = f"{source}: dataset {dataset_id!r} {own[1] if own else spec.CONDITION_FRAMES_KEY}"
        video = settings.get("video") if isinstance(settings.get("video"), dict) else {}
        if own is not None:
            top = settings.get(spec.CONDITION_FRAMES_KEY, own[0])
            if spec.whole_number(top) != spec.whole_number(own[0]):
                problems.append(_two_condition_frames(source, dataset_id, top, video))
                continue
            try:
                frames = condition_frames_value(own[0], where)
            except LongCatVideoError as error:
                problems.append(error)
                continue
        else:
            frames = condition_frames
        if not frames or (own is None and dataset_type != "video"):
            continue  # the config's value marks video datasets only
        start_frames = _marked_i2v(settings) or bool(_conditioning_ids(settings))
        if dataset_type != "video" or start_frames:
            if own is None:
                notes.append(
                    f"dataset {dataset_id!r} stays image-to-video: the config's {spec.CONDITION_FRAMES_KEY} marks "
                    "video datasets without start frames"
                )
                continue
            problems.append(_not_continuable(where, frames, dataset_type, start_frames))
            continue
        counts = [spec.whole_number(video.get(name)) for name in ("num_frames", "min_frames")]
        counts = [count for count in counts if count] or [spec.DEFAULT_NUM_FRAMES]
        if frames >= min(counts):
            problems.append(
                LongCatVideoError(
                    where=where,
                    value=f"{frames} with video.num_frames/min_frames {min(counts)}",
                    rule="continuation needs frames after the condition frames to learn: K must be below every "
                    "clip's frame count",
                    fix=f"use clips longer than {frames} frames (e.g. num_frames {frames + 80}), or a smaller K",
                )
            )
            continue
        plan[dataset_id] = frames
        notes.append(
            f"dataset {dataset_id!r}: video continuation from each clip's first {frames} frames "
            f"({spec.FRAME_RULE.latent_frames(frames)} latent frames clean, at timestep 0, outside the loss)"
            + ("" if own else f" (the config's {spec.CONDITION_FRAMES_KEY})")
        )
    _check_eval_condition(config, source, plan, problems)
    return plan


def _not_continuable(where: str, frames: int, dataset_type: object, start_frames: bool) -> LongCatVideoError:
    if dataset_type != "video":
        return LongCatVideoError(
            where=where,
            value=f"{frames} on dataset_type {dataset_type!r}",
            rule="continuation conditions on a clip's own first frames: only a video dataset has them",
            fix=f'move {spec.CONDITION_FRAMES_KEY} to a "dataset_type": "video" dataset, or remove it here',
        )
    return LongCatVideoError(
        where=where,
        value=f"{frames} on a dataset with start frames (is_i2v / conditioning_data)",
        rule="a dataset trains either image-to-video from its start frames or continuation from its clips' own "
        "first frames, not both",
        fix=f"remove {spec.CONDITION_FRAMES_KEY} to train image-to-video, or is_i2v and conditioning_data to train "
        "continuation (a run may mix both kinds of dataset)",
    )


def _eval_ids(config: object) -> list[str]:
    value = getattr(config, "eval_dataset_id", None)
    if isinstance(value, str):
        return [value] if value.strip() and value != "None" else []
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else []


def _check_eval_condition(config: object, source: str, plan: dict[str, int], problems: list[LongCatVideoError]) -> None:
    """An eval split continues from the K of training, and validation renders frames after it."""
    evals = set(_eval_ids(config))
    trained = sorted({frames for dataset_id, frames in plan.items() if dataset_id not in evals})
    rendered = getattr(config, "validation_num_video_frames", None)
    rendered = spec.whole_number(rendered) if rendered is not None else spec.DEFAULT_NUM_FRAMES
    for dataset_id in sorted(evals & set(plan)):
        frames = plan[dataset_id]
        where = f"{source}: dataset {dataset_id!r} (eval_dataset_id) {spec.CONDITION_FRAMES_KEY}"
        if trained and frames not in trained:
            problems.append(
                LongCatVideoError(
                    where=where,
                    value=f"{frames}, training datasets use {trained}",
                    rule="validation continues the eval clips from as many frames as training continues clips from",
                    fix=f"give the eval split the K of training ({trained[0]}), or set {spec.CONDITION_FRAMES_KEY} "
                    "once in config.json",
                )
            )
        if _truthy(getattr(config, "validation_using_datasets", False)) and rendered is not None and rendered <= frames:
            problems.append(
                LongCatVideoError(
                    where=where,
                    value=f"{frames} with validation_num_video_frames {rendered}",
                    rule="continuation validation renders validation_num_video_frames frames, the first K of them the "
                    "eval clip's: there must be frames after them",
                    fix=f"set validation_num_video_frames above {frames} (e.g. {frames + 80})",
                )
            )


# --- once SimpleTuner has bucketed the clips --------------------------------------------------


def describe_clip_processing(
    config: object, backends: dict | None = None, scans: dict[str, dataset_files.LeftOut] | None = None
) -> list[str]:
    """One line per video dataset: what SimpleTuner does to its clips (bucket, crop, frames, frame rate).

    Read from the host's own metadata (the size it chose for every clip), so the line says what
    happens, not what should; the frame rates come from ``prepare_datasets``'s scan.
    """
    if backends is None:
        from simpletuner.helpers.training.state_tracker import StateTracker

        backends = getattr(StateTracker, "data_backends", {}) or {}
    scans = scans or {}
    framerate = getattr(config, "framerate", None)
    lines = []
    for backend_id, backend in backends.items():
        if backend.get("dataset_type") != "video" or backend.get("metadata_backend") is None:
            continue
        settings = backend.get("config") or {}
        metadata = backend["metadata_backend"]
        entries = [metadata.get_metadata_by_filepath(path) for path in _rank_files(backend)]
        entries = [entry for entry in entries if isinstance(entry, dict) and entry.get("target_size")]
        if not entries:
            continue
        scan = scans.get(backend.get("id", backend_id))
        lines.append(_clip_line(backend.get("id", backend_id), settings, entries, scan, framerate))
    return lines


def _size(value: object) -> tuple[int, int]:
    width, height = value  # the host stores sizes as (width, height) lists
    return int(width), int(height)


def _clip_line(
    dataset_id: object, settings: dict, entries: list[dict], scan: dataset_files.LeftOut | None, framerate: object
) -> str:
    crop = _truthy(settings.get("crop"))
    groups = Counter(
        (_size(e["original_size"]), _size(e["target_size"]), _size(e.get("intermediary_size") or e["target_size"]))
        for e in entries
    )
    sizes = []
    for (original, target, middle), count in groups.most_common(4):
        text = f"{original[0]}x{original[1]} -> {target[0]}x{target[1]} ({count} clip{'s' if count > 1 else ''})"
        before, after = original[0] / original[1], target[0] / target[1]
        if crop and middle != target:
            text += f": resized to {middle[0]}x{middle[1]}, then cropped (crop_style {settings.get('crop_style') or 'random'})"
        elif abs(before - after) > 0.01:
            text += f": squashed, aspect {before:.2f} -> {after:.2f} (crop is off; crop: true would crop instead)"
        elif original != target:
            text += ": resized"
        sizes.append(text)
    if len(groups) > 4:
        sizes.append(f"{len(groups) - 4} more size groups")
    video = settings.get("video") or {}
    num_frames = video.get("num_frames")
    # The host's metadata keeps the count after its own trim to a valid count; the scan read the files.
    infos = scan.infos if scan else {}
    source = sorted(infos[path].frames for path in infos if not infos[path].problem) or sorted(
        int(e.get("original_num_frames") or e.get("num_frames") or 0) for e in entries
    )
    more = "+" if any(not info.counted for info in infos.values()) else ""
    span = f"{source[0]}{more}" if source[0] == source[-1] else f"{source[0]} to {source[-1]}{more}"
    if num_frames and source[-1] > int(num_frames):
        frames = f"the first {num_frames} of {span} (video.num_frames; later frames are not used)"
    else:
        frames = f"all {span}"
    rates = sorted({round(info.fps, 3) for info in (scan.infos.values() if scan else []) if info.fps})
    if not rates:
        rate = f"the files give none; validation videos are written at framerate {framerate}"
    elif framerate and rates == [float(framerate)]:
        rate = f"{rates[0]:g} fps, the same as framerate"
    else:
        shown = ", ".join(f"{r:g}" for r in rates)
        speed = (
            f", so validation videos play {float(framerate) / rates[0]:.2f}x as fast as the clips"
            if framerate and len(rates) == 1
            else ""
        )
        rate = f"clips at {shown} fps, framerate {framerate}: frames are used as they are, not resampled{speed}"
    return (
        f"LongCat-Video dataset {dataset_id!r}, {len(entries)} clips: size {'; '.join(sizes)}. Frames: {frames}. "
        f"Frame rate: {rate}."
    )
