"""Config-time rules, the data backend config as the family reads it, and the clip <-> start-frame pairing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host.dataset_files import ClipInfo, LeftOut
from simpletuner_longcat_video.host.datasets import (
    START_FRAMES_FOLDER,
    check_datasets,
    check_training_config,
    describe_clip_processing,
    has_validation_start_images,
    parse_resolutions,
    prepare_datasets,
)
from simpletuner_longcat_video.spec import check_frames
from simpletuner_longcat_video.testing.tiny import build_tiny_dataset


class Metadata:
    """The two things the rule reads from a host metadata backend: bucketed files and per-file metadata."""

    def __init__(self, files: list[str]) -> None:
        self.aspect_ratio_bucket_indices = {"1.0": list(files)}
        self.image_metadata = {path: {"original_size": (64, 64)} for path in files}

    def get_metadata_by_filepath(self, path: str) -> dict | None:
        return self.image_metadata.get(path)


def backends(clips: list[str], frames: list[str], num_frames: int = 93) -> dict:
    cond = {
        "id": "longcat-video-cond",
        "dataset_type": "conditioning",
        "config": {"instance_data_dir": "/d/frames"},
        "metadata_backend": Metadata([f"/d/frames/{name}" for name in frames]),
    }
    clip = {
        "id": "longcat-video-train",
        "dataset_type": "video",
        "config": {"instance_data_dir": "/d/clips", "video": {"num_frames": num_frames, "is_i2v": True}},
        "metadata_backend": Metadata([f"/d/clips/{name}" for name in clips]),
        "conditioning_data": [cond],
    }
    return {"longcat-video-train": clip, "longcat-video-cond": cond}


CONFIG = SimpleNamespace(data_backend_config="config/multidatabackend.json")


def test_paired_by_name_marks_the_host_lookup_and_links_each_frame_to_its_clip():
    data = backends(["a.mp4", "sub/b.mp4"], ["a.png", "sub/b.png"])
    check_datasets(CONFIG, data)
    cond = data["longcat-video-cond"]
    assert cond["config"]["conditioning_config"]["type"] == "i2v_first_frame"
    assert (
        cond["metadata_backend"].image_metadata["/d/frames/sub/b.png"]["training_sample_path"] == "/d/clips/sub/b.mp4"
    )


def test_missing_start_frame_is_named():
    with pytest.raises(LongCatVideoError) as error:
        check_datasets(CONFIG, backends(["a.mp4", "b.mp4", "c.mp4"], ["a.png", "c.png"]))
    text = str(error.value)
    assert "1 clip(s) in /d/clips have no start frame in /d/frames: b" in text
    assert "config/multidatabackend.json" in text and "'longcat-video-cond'" in text


def test_extra_start_frame_is_named():
    with pytest.raises(LongCatVideoError, match=r"1 start frame\(s\) in /d/frames have no clip in /d/clips: orphan"):
        check_datasets(CONFIG, backends(["a.mp4"], ["a.png", "orphan.png"]))


def test_name_mismatch_names_both_sides():
    with pytest.raises(LongCatVideoError) as error:
        check_datasets(CONFIG, backends(["clip_01.mp4"], ["clip_1.png"]))
    assert "no start frame in /d/frames: clip_01" in str(error.value)
    assert "have no clip in /d/clips: clip_1" in str(error.value)


def test_same_path_pairs_need_no_mapping():
    data = backends(["a.mp4"], ["a.mp4"])
    check_datasets(CONFIG, data)
    assert "conditioning_config" not in data["longcat-video-cond"]["config"]


def test_non_png_start_frames_that_reach_the_host_are_refused_with_the_fix():
    # Only for records that did not pass through prepare_datasets (it hands the host PNG copies).
    with pytest.raises(LongCatVideoError, match=r"'a\.jpg'.*reach SimpleTuner as <clip name>\.png.*\*\.jpg"):
        check_datasets(CONFIG, backends(["a.mp4"], ["a.jpg"]))


def test_dataset_frame_count_rule_names_dataset_and_field():
    with pytest.raises(LongCatVideoError) as error:
        check_datasets(CONFIG, backends(["a.mp4"], ["a.png"], num_frames=90))
    assert "dataset 'longcat-video-train' video.num_frames = 90" in str(error.value)
    assert "use 89 or 93" in str(error.value)


@pytest.mark.parametrize(("frames", "ok"), [(1, True), (5, True), (93, True), (92, False), (0, False), ("x", False)])
def test_frame_rule(frames, ok):
    if ok:
        assert check_frames(frames, "f") == frames
    else:
        with pytest.raises(LongCatVideoError):
            check_frames(frames, "f")


def test_training_config_rules():
    check_training_config(
        SimpleNamespace(aspect_bucket_alignment=64, validation_resolution="832x480", validation_num_video_frames=93)
    )
    for grid in (16, 32, 64):
        check_training_config(SimpleNamespace(aspect_bucket_alignment=grid))
    for grid in (8, 24, 48):
        with pytest.raises(LongCatVideoError, match=rf"aspect_bucket_alignment = {grid}.*one of \[16, 32, 64\]"):
            check_training_config(SimpleNamespace(aspect_bucket_alignment=grid))
    with pytest.raises(LongCatVideoError, match=r"830x480: width and height must be divisible by 16"):
        check_training_config(SimpleNamespace(validation_resolution="830x480"))
    with pytest.raises(LongCatVideoError, match="validation_num_video_frames = 82"):
        check_training_config(SimpleNamespace(validation_num_video_frames=82))
    assert parse_resolutions("832x480,512") == [(832, 480), (512, 512)]


START = [{"path": "/data/start.png", "prompt": "a red square slides"}]


def test_a_validation_size_off_the_bucket_grid_is_said(caplog):
    """832x480 (LongCat-Video's 480p) is not on the 64 px grid: training would use 832x512."""
    with caplog.at_level("WARNING", logger="simpletuner_longcat_video.host.datasets"):
        check_training_config(SimpleNamespace(aspect_bucket_alignment=64, validation_resolution="832x480"))
    (record,) = caplog.records
    assert "832x480 is not on the 64 px bucket grid" in record.getMessage()
    assert "832x512" in record.getMessage() and "aspect_bucket_alignment to 16" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="simpletuner_longcat_video.host.datasets"):
        check_training_config(SimpleNamespace(aspect_bucket_alignment=16, validation_resolution="832x480"))
        check_training_config(SimpleNamespace(aspect_bucket_alignment=64, validation_resolution="1280x704"))
    assert not caplog.records


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("", False),
        ("None", False),
        ("[]", False),
        ([], False),
        (START, True),  # a config file's list
        (json.dumps(START), True),  # the WebUI's JSON text field
        ("[{not json", True),  # malformed: left to the host, which names --validation_input
    ],
)
def test_validation_start_images_are_recognised_in_both_shapes(value, expected):
    assert has_validation_start_images(SimpleNamespace(validation_input=value)) is expected
    assert has_validation_start_images(SimpleNamespace()) is False


# --- prepare_datasets: multidatabackend.json as loaded, before the host configures anything -----


def _user_config(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(data_backend_config="config/multidatabackend.json", cache_dir=str(tmp_path / "cache"))


def _shipped_form(**train_video) -> list[dict]:
    """examples/multidatabackend.json's train pair with relative paths, sizes for the tiny clips."""
    clips = {
        "id": "longcat-video-train",
        "type": "local",
        "dataset_type": "video",
        "instance_data_dir": "datasets/longcat-video/train/clips",
        "caption_strategy": "textfile",
        "resolution": 64,
        "resolution_type": "pixel",
        "cache_dir_vae": "cache/vae/longcat-video/train/clips",
        "video": {"num_frames": 9, "min_frames": 9, "is_i2v": True, **train_video},
        "conditioning_data": ["longcat-video-cond"],
    }
    frames = {
        "id": "longcat-video-cond",
        "type": "local",
        "dataset_type": "conditioning",
        "instance_data_dir": "datasets/longcat-video/train/start_frames",
        "caption_strategy": None,
        "resolution": 480,
        "cache_dir_vae": "cache/vae/longcat-video/train/start_frames",
    }
    return [clips, frames]


@pytest.fixture
def users_folder(tmp_path, monkeypatch):
    build_tiny_dataset(tmp_path / "datasets" / "longcat-video", clips=3, val_clips=0, frames=9)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_relative_data_folders_are_read_from_the_working_directory(users_folder):
    datasets = _shipped_form()
    prepare_datasets(_user_config(users_folder), datasets, log=False)
    assert datasets[0]["instance_data_dir"] == str(users_folder / "datasets/longcat-video/train/clips")
    assert datasets[1]["instance_data_dir"] == str(users_folder / "datasets/longcat-video/train/start_frames")
    assert datasets[0]["cache_dir_vae"] == "cache/vae/longcat-video/train/clips"  # caches keep their names


def test_the_seeds_is_i2v_beside_dataset_type_means_video_is_i2v(users_folder):
    datasets = _shipped_form()
    del datasets[0]["video"]["is_i2v"]
    datasets[0]["is_i2v"] = True
    prepare_datasets(_user_config(users_folder), datasets, log=False)
    assert datasets[0]["video"]["is_i2v"] is True and "is_i2v" not in datasets[0]


def test_the_seeds_dataset_without_a_video_block_trains_93_frames(users_folder):
    # The seed's form verbatim: no video block. LongCat-Video's 93 frames apply, so the tiny 9-frame
    # clips are refused by name (before this, the host's 5 s at framerate would have been used).
    datasets = _shipped_form()
    del datasets[0]["video"]
    datasets[0]["is_i2v"] = True
    with pytest.raises(LongCatVideoError, match="every clip is shorter than min_frames = 93"):
        prepare_datasets(_user_config(users_folder), datasets, log=False)
    assert datasets[0]["video"] == {"is_i2v": True, "num_frames": 93}


def test_start_frames_in_other_formats_reach_the_host_as_png_copies(users_folder):
    frames = users_folder / "datasets/longcat-video/train/start_frames"
    Image.open(frames / "clip_001.png").convert("RGB").save(frames / "clip_001.jpg")
    (frames / "clip_001.png").unlink()
    datasets = _shipped_form()
    prepare_datasets(_user_config(users_folder), datasets, log=False)
    copies = users_folder / "cache" / START_FRAMES_FOLDER / "longcat-video-cond"
    assert datasets[1]["instance_data_dir"] == str(copies)
    assert sorted(os.listdir(copies)) == [".longcat_start_frames.json", "clip_000.png", "clip_001.png", "clip_002.png"]
    assert sorted(os.listdir(frames)) == ["clip_000.png", "clip_001.jpg", "clip_002.png"]


def test_png_start_frames_are_read_where_they_are(users_folder):
    datasets = _shipped_form()
    prepare_datasets(_user_config(users_folder), datasets, log=False)
    assert datasets[1]["instance_data_dir"] == str(users_folder / "datasets/longcat-video/train/start_frames")
    assert not (users_folder / "cache").exists()


def test_start_frames_take_their_clips_resolution_settings(users_folder):
    datasets = _shipped_form()
    prepare_datasets(_user_config(users_folder), datasets, log=False)
    assert (datasets[1]["resolution"], datasets[1]["resolution_type"]) == (64, "pixel")


class BucketedMetadata:
    def __init__(self, entries: dict[str, dict]) -> None:
        self.aspect_ratio_bucket_indices = {"1.0": list(entries)}
        self.entries = entries

    def get_metadata_by_filepath(self, path: str) -> dict | None:
        return self.entries.get(path)


def _bucketed(crop: bool, entries: dict[str, dict]) -> dict:
    settings = {"crop": crop, "video": {"num_frames": 9}}
    return {
        "train": {
            "id": "train",
            "dataset_type": "video",
            "config": settings,
            "metadata_backend": BucketedMetadata(entries),
        }
    }


def test_the_log_line_says_what_the_host_did_to_each_clip():
    entries = {
        "/d/a.mp4": {
            "original_size": [100, 72],
            "target_size": [64, 64],
            "intermediary_size": [64, 64],
            "num_frames": 9,
        },
        "/d/b.mp4": {"original_size": [64, 64], "target_size": [64, 64], "num_frames": 9},
    }
    scan = LeftOut(
        needed_frames=9, infos={"/d/a.mp4": ClipInfo(50, 100, 72, 24.0), "/d/b.mp4": ClipInfo(9, 64, 64, 24.0)}
    )
    (line,) = describe_clip_processing(SimpleNamespace(framerate=16), _bucketed(False, entries), {"train": scan})
    assert "'train', 2 clips" in line
    assert "100x72 -> 64x64 (1 clip): squashed, aspect 1.39 -> 1.00 (crop is off" in line
    assert "64x64 -> 64x64 (1 clip)." in line or "64x64 -> 64x64 (1 clip);" in line
    assert "Frames: the first 9 of 9 to 50" in line
    assert (
        "clips at 24 fps, framerate 16: frames are used as they are, not resampled, so validation videos play 0.67x"
        in line
    )


def test_the_log_line_for_cropped_clips_names_the_crop():
    entries = {"/d/a.mp4": {"original_size": [100, 72], "target_size": [64, 64], "intermediary_size": [88, 64]}}
    (line,) = describe_clip_processing(SimpleNamespace(framerate=8), _bucketed(True, entries), {})
    assert "100x72 -> 64x64 (1 clip): resized to 88x64, then cropped (crop_style random)" in line
    assert "the files give none; validation videos are written at framerate 8" in line
