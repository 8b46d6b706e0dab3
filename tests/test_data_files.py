"""What the plugin reads from dataset files: clip facts, start-frame sizes, PNG copies of start frames."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from simpletuner_longcat_video.host import dataset_files as data_files
from simpletuner_longcat_video.testing.tiny import synthetic_clip, write_video


def _picture(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


FORMATS = [(".png", "PNG"), (".PNG", "PNG"), (".jpg", "JPEG"), (".JPG", "JPEG"), (".jpeg", "JPEG")]
FORMATS += [(".webp", "WEBP"), (".bmp", "BMP"), (".BMP", "BMP"), (".tif", "TIFF")]


def test_every_common_start_frame_format_becomes_a_png_with_the_same_pixels(tmp_path):
    source, folder = tmp_path / "start_frames", tmp_path / "copies"
    source.mkdir()
    sources = {}
    for index, (suffix, kind) in enumerate(FORMATS):
        path = source / f"clip_{index}{suffix}"
        Image.fromarray(_picture(index)).save(path, format=kind)
        sources[f"clip_{index}"] = str(path)
    before = sorted(os.listdir(source))
    assert data_files.mirror_as_png(sources, str(folder)) == len(FORMATS)
    for key, path in sources.items():
        with Image.open(path) as original, Image.open(folder / f"{key}.png") as copy:
            assert copy.format == "PNG"
            # What the host decodes from the copy is what it would decode from the file (a JPEG's
            # decoded pixels, not the picture before compression).
            assert np.array_equal(np.asarray(copy.convert("RGB")), np.asarray(original.convert("RGB"))), path
    assert sorted(os.listdir(source)) == before  # the user's folder is not touched


def test_exif_rotation_is_applied_once(tmp_path):
    picture = Image.fromarray(_picture(1, height=32, width=64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = tmp_path / "turned.jpg"
    picture.save(path, format="JPEG", exif=exif)
    assert data_files.image_size(str(path)) == (32, 64)
    data_files.mirror_as_png({"turned": str(path)}, str(tmp_path / "copies"))
    with Image.open(tmp_path / "copies" / "turned.png") as copy:
        assert copy.size == (32, 64) and copy.getexif().get(0x0112) is None


def test_copies_follow_their_sources(tmp_path):
    first, second = tmp_path / "a.jpg", tmp_path / "b.webp"
    Image.fromarray(_picture(2)).save(first)
    Image.fromarray(_picture(3)).save(second)
    folder = tmp_path / "copies"
    assert data_files.mirror_as_png({"a": str(first), "b": str(second)}, str(folder)) == 2
    assert data_files.mirror_as_png({"a": str(first), "b": str(second)}, str(folder)) == 0  # up to date
    Image.fromarray(_picture(4)).save(first)
    os.utime(first, ns=(1, 1))  # a replaced file with an old time still differs in size or time
    assert data_files.mirror_as_png({"a": str(first)}, str(folder)) == 1
    with Image.open(folder / "a.png") as copy, Image.open(first) as now:
        assert np.array_equal(np.asarray(copy), np.asarray(now.convert("RGB")))
    assert not (folder / "b.png").exists()  # its start frame is gone, so is its copy


def test_a_video_start_frame_gives_its_first_frame(tmp_path):
    video = synthetic_clip(7, frames=5, height=32, width=48)
    path = write_video(tmp_path / "start.mov", video)
    data_files.mirror_as_png({"sub/start": str(path)}, str(tmp_path / "copies"))
    with Image.open(tmp_path / "copies" / "sub" / "start.png") as copy:
        assert copy.size == (48, 32)
        # H.264 at crf 10 is nearly lossless: the copy is the decoded first frame, not another one.
        error = np.abs(np.asarray(copy, dtype=int) - video[0].astype(int)).mean()
        assert error < 4 < np.abs(np.asarray(copy, dtype=int) - video[-1].astype(int)).mean()


@pytest.mark.parametrize("frames", [6, 9, 14])
def test_clip_facts(tmp_path, frames):
    path = write_video(tmp_path / "clip.mp4", synthetic_clip(0, frames=frames, height=48, width=80), fps=12)
    info = data_files.clip_info(str(path), enough=12)
    assert (info.width, info.height, info.fps, info.problem) == (80, 48, 12.0, None)
    # Counted exactly below the limit; from the container's own count above it.
    assert info.frames == frames and info.counted


def test_a_file_that_is_no_image_is_named(tmp_path):
    path = tmp_path / "clip.png"
    path.write_bytes(b"not a picture")
    assert data_files.image_size(str(path)).startswith("cannot be read as an image")


def test_a_missing_pyav_is_not_reported_as_broken_clips(tmp_path, monkeypatch):
    """Without PyAV every clip read as "corrupt or truncated: ModuleNotFoundError" (seen on a bare GPU image)."""
    path = write_video(tmp_path / "clip.mp4", synthetic_clip(0, frames=5, height=32, width=32))
    assert data_files.clip_info(str(path)).frames == 5
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # what `import av` sees when it is not installed
    with pytest.raises(ImportError):
        data_files.clip_info(str(path))
