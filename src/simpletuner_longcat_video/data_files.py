"""What a dataset folder holds versus what the host will train from it.

SimpleTuner 4.10.1 drops some bad files without stopping (measured with ``simpletuner train``):

* a clip it cannot decode (random bytes, a truncated or a zero-byte ``.mp4``) is logged as an
  error under a temporary file name and left out;
* a clip with fewer frames than the dataset's ``min_frames`` (at least ``num_frames``) is left
  out without a word;
* an empty caption file is trained as the empty prompt.

Each of these trains on less, or on something else, than the user prepared, and in a paired I2V
dataset a dropped clip would surface only as a start frame "without a clip". So they are named
here, with the reason, before the first step. Clips the host filters on purpose (smaller than
``minimum_image_size``, longer than ``max_frames``) are left to it.
"""

from __future__ import annotations

import os
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


def probe_clip(path: str, enough: int | None = None) -> tuple[int, str | None]:
    """``(frames, problem)``: the decodable frame count, and why the clip is unusable (None if it is not).

    Decoding stops after ``enough`` frames: clips the host filtered for being long need not be read whole.
    """
    try:
        if os.path.getsize(path) == 0:
            return 0, "is empty (0 bytes)"
        import av

        with av.open(path) as container:
            if not container.streams.video:
                return 0, "has no video stream"
            frames = 0
            for _ in container.decode(video=0):
                frames += 1
                if enough is not None and frames >= enough:
                    break
    # PyAV raises its own error family, OSError subclasses and ValueError for broken files;
    # whichever it is, the clip cannot be decoded, which is what the user needs to hear.
    except Exception as error:
        return 0, f"cannot be decoded (corrupt or truncated: {type(error).__name__})"
    if frames == 0:
        return 0, "has no frames"
    return frames, None


@dataclass
class LeftOut:
    """Clips on disk that the host did not take into its bucket lists, sorted by why."""

    needed_frames: int
    broken: list[tuple[str, str]] = field(default_factory=list)  # (name, problem)
    short: list[tuple[int, str]] = field(default_factory=list)  # (frames, name)
    filtered: list[str] = field(default_factory=list)  # paths the host's own filters left out

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
            continue
        # The smallest valid count >= needed is at most needed + 3; more frames change nothing.
        frames, problem = probe_clip(path, enough=needed + spec.VAE_TEMPORAL_COMPRESSION - 1)
        name = os.path.relpath(path, root)
        if problem:
            result.broken.append((name, problem))
        elif spec.FRAME_RULE.nearest_valid_below(frames) < needed:
            result.short.append((frames, name))
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


def check_captions(where: str, settings: dict, used: Iterable[str]) -> None:
    """With ``caption_strategy: textfile`` every clip's ``<name>.txt`` must say something."""
    if settings.get("caption_strategy") != "textfile":
        return
    if settings.get("prepend_instance_prompt") and str(settings.get("instance_prompt") or "").strip():
        return  # the instance prompt is put in front of every caption, so none is empty
    empty = []
    for path in used:
        caption = os.path.splitext(path)[0] + ".txt"
        try:
            with open(caption, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue  # a missing caption file is the host's own error (FileNotFoundError, naming it)
        if not any(line.strip() for line in text.splitlines()):
            empty.append(os.path.basename(caption))
    if empty:
        raise LongCatVideoError(
            where=where,
            value=listed(sorted(empty)),
            rule="caption files must not be empty; the host would train these clips on the empty prompt "
            "(the unconditional branch CFG relies on)",
            fix="write a caption into each file, or remove the clip and its caption",
        )
