"""What a dataset folder holds versus what the host will train from it, read from the files.

SimpleTuner 4.10.1 drops some bad files without stopping (measured with ``simpletuner train``):

* a clip it cannot decode (random bytes, a truncated or a zero-byte ``.mp4``) is logged as an
  error under a temporary file name and left out;
* a clip with fewer frames than the dataset's ``min_frames`` (at least ``num_frames``) is left
  out without a word;
* an empty caption file is trained as the empty prompt.

Each of these trains on less, or on something else, than the user prepared, and in a paired I2V
dataset a dropped clip would surface only as a start frame "without a clip". So they are named
here, with the reason, before anything is encoded (``datasets.prepare_datasets`` scans every clip
when SimpleTuner has read the data backend config) and again for what the host left out once it
has scanned the datasets. Clips the host filters on purpose (smaller than ``minimum_image_size``,
longer than ``max_frames``) are left to it.

Start frames reach the host as ``<clip name>.png`` (the only name its first-frame lookup tries);
:func:`mirror_as_png` writes such a copy of every start frame into a folder of the plugin's own,
so JPEG, WEBP, BMP, ... start frames train without the user converting anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.errors import LongCatVideoError, listed


def video_suffixes() -> frozenset[str]:
    """The suffixes the host scans as video (its own list, so both sides agree)."""
    from simpletuner.helpers.training import video_file_extensions

    return frozenset(f".{ext.lower()}" for ext in video_file_extensions)


def files_on_disk(root: str | None, suffixes: Iterable[str]) -> list[str]:
    """Files below ``root`` whose suffix (any letter case) is one of ``suffixes``; [] if ``root`` is no folder."""
    if not root or not os.path.isdir(root):
        return []
    wanted = {suffix.lower() for suffix in suffixes}
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, name) for name in names if os.path.splitext(name)[1].lower() in wanted]
    return sorted(found)


def image_suffixes() -> frozenset[str]:
    """The suffixes Pillow opens (the host's own image list), without the video and audio ones."""
    from PIL import Image
    from simpletuner.helpers.training import audio_file_extensions

    Image.init()
    opened = {ext.lower() for ext, name in Image.registered_extensions().items() if name in Image.OPEN}
    media = video_suffixes() | {f".{ext.lower()}" for ext in audio_file_extensions}
    return frozenset(opened - media)


@dataclass(frozen=True)
class ClipInfo:
    """A clip as read from its file: decodable frames, size, frame rate, and why it is unusable."""

    frames: int
    width: int = 0
    height: int = 0
    fps: float | None = None
    problem: str | None = None
    counted: bool = True  # False: decoding stopped at ``enough``; the clip may hold more frames


def clip_info(path: str, enough: int | None = None) -> ClipInfo:
    """Read ``path``'s frame count, size and frame rate; ``problem`` says why it cannot train.

    The first frame is always decoded, so a file that opens but does not decode is named. The count
    is the container's own when it declares at least ``enough`` frames (reading a long clip whole
    would cost seconds per clip at start-up); below that, frames are decoded (stopping at
    ``enough``), so a clip near or under the limit is counted exactly.
    """
    # Imported outside the try: a missing PyAV is an installation problem, not a broken clip.
    import av

    try:
        if os.path.getsize(path) == 0:
            return ClipInfo(0, problem="is empty (0 bytes)")
        with av.open(path) as container:
            if not container.streams.video:
                return ClipInfo(0, problem="has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate
            fps = float(rate) if rate else None
            declared = int(stream.frames or 0)
            frames, width, height, counted = 0, stream.width, stream.height, True
            for frame in container.decode(video=0):
                frames += 1
                width, height = frame.width, frame.height
                if enough is not None and declared >= enough:
                    frames = declared
                    break
                if enough is not None and frames >= enough:
                    counted = False
                    break
    # PyAV raises its own error family, OSError subclasses and ValueError for broken files;
    # whichever it is, the clip cannot be decoded, which is what the user needs to hear.
    except Exception as error:
        return ClipInfo(0, problem=f"cannot be decoded (corrupt or truncated: {type(error).__name__})")
    if frames == 0:
        return ClipInfo(0, problem="has no frames")
    return ClipInfo(frames, width, height, fps, counted=counted)


def probe_clip(path: str, enough: int | None = None) -> tuple[int, str | None]:
    """``(frames, problem)`` of :func:`clip_info`."""
    info = clip_info(path, enough)
    return info.frames, info.problem


def image_size(path: str) -> tuple[int, int] | str:
    """``(width, height)`` of a start frame as the host sees it (EXIF rotation applied), or the problem.

    A video start frame (the host then uses its first frame) is measured like a clip.
    """
    if os.path.splitext(path)[1].lower() in video_suffixes():
        info = clip_info(path, 1)
        return info.problem or (info.width, info.height)
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            # EXIF orientations 5-8 turn the picture by 90 degrees; the host applies them.
            if image.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
    except Exception as error:  # Pillow's errors for a damaged or foreign file vary by format
        return f"cannot be read as an image ({type(error).__name__})"
    return width, height


@dataclass
class LeftOut:
    """Clips on disk that the host did not take into its bucket lists, sorted by why."""

    needed_frames: int
    broken: list[tuple[str, str]] = field(default_factory=list)  # (name, problem)
    short: list[tuple[int, str]] = field(default_factory=list)  # (frames, name)
    filtered: list[str] = field(default_factory=list)  # usable paths (left out by the host's own filters)
    infos: dict[str, ClipInfo] = field(default_factory=dict)  # path -> what its file holds
    kept: int = 0  # clips the host took (not probed)

    @property
    def refused(self) -> bool:
        return bool(self.broken or self.short)

    def refused_names(self) -> list[str]:
        return [name for name, _ in self.broken] + [name for _, name in self.short]


def scan_left_out(root: str | None, used: Iterable[str], min_frames: object, num_frames: object) -> LeftOut:
    """Probe every clip under ``root`` that is not in ``used`` (the host's bucketed files)."""
    used_paths = {os.path.abspath(path if os.path.isabs(path) else os.path.join(root or "", path)) for path in used}
    needed = max(_positive(min_frames), _positive(num_frames), 1)
    result = LeftOut(needed_frames=needed)
    for path in files_on_disk(root, video_suffixes()):
        if os.path.abspath(path) in used_paths:
            result.kept += 1
            continue
        # The smallest valid count >= needed is at most needed + 3; more frames change nothing.
        info = clip_info(path, enough=needed + spec.VAE_TEMPORAL_COMPRESSION - 1)
        result.infos[path] = info
        name = os.path.relpath(path, root)
        if info.problem:
            result.broken.append((name, info.problem))
        elif spec.FRAME_RULE.nearest_valid_below(info.frames) < needed:
            result.short.append((info.frames, name))
        else:
            result.filtered.append(path)
    return result


def _positive(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def check_left_out(where: str, left_out: LeftOut) -> None:
    """Refuse the undecodable and too-short clips of a scan, each named with its reason."""
    if not left_out.refused:
        return
    needed = left_out.needed_frames
    if left_out.short and not (left_out.filtered or left_out.broken or left_out.kept):
        # Every clip is too short: SimpleTuner 4.10.1 alone stops with "Dataset produced no usable
        # samples", which names neither the frames nor the setting to change.
        shortest, longest = min(frames for frames, _ in left_out.short), max(frames for frames, _ in left_out.short)
        usable = spec.FRAME_RULE.nearest_valid_below(longest)
        span = f"{longest}" if shortest == longest else f"{shortest} to {longest}"
        raise LongCatVideoError(
            where=where,
            value=f"{len(left_out.short)} clip(s) of {span} frames",
            rule=f"every clip is shorter than min_frames = {needed}, so there is no sample to train on "
            "(LongCat-Video cannot pad missing frames)",
            fix=f"set video.num_frames and video.min_frames to {usable} (the longest valid count your longest clip "
            f"has), or use clips of at least {needed} frames",
        )
    named = [f"{name} {problem}" for name, problem in left_out.broken]
    named += [f"{name} has {frames} frames (needs {needed})" for frames, name in sorted(left_out.short)]
    fixes = []
    if left_out.broken:
        fixes.append(
            "re-encode or replace the broken files (e.g. `ffmpeg -i in.mp4 -c:v libx264 out.mp4`), or move them "
            "out of the dataset folder"
        )
    if left_out.short:
        usable = spec.FRAME_RULE.nearest_valid_below(min(frames for frames, _ in left_out.short))
        fixes.append(
            f"for the short clips lower video.num_frames and video.min_frames to {usable} (the longest valid "
            "count the shortest clip has), or remove them"
        )
    raise LongCatVideoError(
        where=where,
        value=listed(named),
        rule=f"every clip must decode and have at least min_frames = {needed} frames: the host skips other clips "
        "and trains on the rest without stopping (LongCat-Video cannot pad missing frames)",
        fix="; ".join(fixes),
    )


def check_video_dataset_holds_videos(where: str, root: str | None, used: Iterable[str]) -> None:
    """A video dataset whose training files are images is an image dataset in the wrong place."""
    suffixes = video_suffixes()
    images = sorted(os.path.basename(path) for path in used if os.path.splitext(path)[1].lower() not in suffixes)
    if images:
        raise LongCatVideoError(
            where=where,
            value=listed(images),
            rule=f"a video dataset must hold video clips; {len(images)} image file(s) in {root} would train as "
            "one-frame videos",
            fix="put the clips (.mp4, ...) there; start images belong in the conditioning dataset (same file names), "
            "images for text-to-image in a dataset_type image dataset without is_i2v",
        )


def check_captions(where: str, settings: dict, used: Iterable[str], *, missing_too: bool = False) -> None:
    """With ``caption_strategy: textfile`` every clip's ``<name>.txt`` must say something.

    ``missing_too``: also refuse clips without a caption file (before anything is cached; the host
    itself stops on the first one, but only when it embeds that dataset's captions).
    """
    if settings.get("caption_strategy") != "textfile":
        return
    if settings.get("prepend_instance_prompt") and str(settings.get("instance_prompt") or "").strip():
        return  # the instance prompt is put in front of every caption, so none is empty
    empty, missing = [], []
    for path in used:
        caption = os.path.splitext(path)[0] + ".txt"
        try:
            with open(caption, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            missing.append(os.path.basename(caption))
            continue
        if not any(line.strip() for line in text.splitlines()):
            empty.append(os.path.basename(caption))
    if missing and missing_too:
        raise LongCatVideoError(
            where=where,
            value=listed(sorted(missing)),
            rule="with caption_strategy textfile every clip needs its caption file <clip name>.txt beside it",
            fix="write the caption files, or set another caption_strategy",
        )
    if empty:
        raise LongCatVideoError(
            where=where,
            value=listed(sorted(empty)),
            rule="caption files must not be empty; the host would train these clips on the empty prompt "
            "(the unconditional branch CFG relies on)",
            fix="write a caption into each file, or remove the clip and its caption",
        )


# The modes Pillow writes into a PNG as they are; others (CMYK, YCbCr, ...) become RGB, as the host
# makes them when it reads a start frame.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
MANIFEST = ".longcat_start_frames.json"


def _write_png(source: str, target: str) -> None:
    """``source`` (any image Pillow reads, or a video: its first frame) as the PNG ``target``, atomically."""
    from PIL import Image, ImageOps

    temporary = f"{target}.{os.getpid()}.tmp"
    if os.path.splitext(source)[1].lower() in video_suffixes():
        import av

        with av.open(source) as container:
            image = next(container.decode(video=0)).to_image()
        image.save(temporary, format="PNG", compress_level=1)
    else:
        with Image.open(source) as image:
            if image.format == "PNG":
                shutil.copyfile(source, temporary)  # already what the host reads: the same bytes
            else:
                # Orientation is applied here, and the PNG carries none, so the host's own EXIF
                # step leaves these pixels as they are: the same picture the source shows.
                picture = ImageOps.exif_transpose(image)
                if picture.mode not in _PNG_MODES:
                    picture = picture.convert("RGB")
                picture.save(temporary, format="PNG", compress_level=1)
    os.replace(temporary, target)


def _read_manifest(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            found = json.load(handle)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def mirror_as_png(sources: dict[str, str], folder: str) -> int:
    """Make ``folder/<key>.png`` hold each start frame of ``sources`` (pairing key -> file); returns
    how many were (re)written.

    A PNG is copied, anything else converted (the first frame of a video). A file whose source did
    not change since it was written (path, size, modification time) is kept; a PNG whose key is gone
    is removed, so the folder holds exactly the dataset's start frames. Every write is atomic
    (temporary name, then rename), so several processes doing this at once leave whole files.
    """
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, MANIFEST)
    manifest = _read_manifest(manifest_path)
    stamps, written = {}, 0
    for key, source in sorted(sources.items()):
        status = os.stat(source)
        stamps[key] = [os.path.abspath(source), status.st_size, status.st_mtime_ns]
        target = os.path.join(folder, f"{key}.png")
        if manifest.get(key) == stamps[key] and os.path.isfile(target):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _write_png(source, target)
        written += 1
    wanted = {os.path.normpath(os.path.join(folder, f"{key}.png")) for key in sources}
    for path in files_on_disk(folder, {".png"}):
        if os.path.normpath(path) not in wanted:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass  # another process removed it first
    temporary = f"{manifest_path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(stamps, handle, indent=1)
    os.replace(temporary, manifest_path)
    return written
