"""Config-time rules and the clip <-> start-frame pairing rule (host-shaped dataset records)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from simpletuner_longcat_video.data import (
    check_datasets,
    check_frames,
    check_training_config,
    has_validation_start_images,
    parse_resolutions,
)
from simpletuner_longcat_video.errors import LongCatVideoError


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


def test_non_png_start_frames_are_refused_with_the_fix():
    with pytest.raises(LongCatVideoError, match=r"'a\.jpg'.*must be PNG"):
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
    with pytest.raises(LongCatVideoError, match=r"aspect_bucket_alignment = 32.*64 px grid"):
        check_training_config(SimpleNamespace(aspect_bucket_alignment=32))
    with pytest.raises(LongCatVideoError, match=r"830x480: width and height must be divisible by 16"):
        check_training_config(SimpleNamespace(validation_resolution="830x480"))
    with pytest.raises(LongCatVideoError, match="validation_num_video_frames = 82"):
        check_training_config(SimpleNamespace(validation_num_video_frames=82))
    assert parse_resolutions("832x480,512") == [(832, 480), (512, 512)]


START = [{"path": "/data/start.png", "prompt": "a red square slides"}]


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
