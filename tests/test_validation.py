"""Validation from the eval split: the start frame it pairs, the start image it saves, the file names it writes.

The end-to-end check (the real host, edit-style pairs) is in tests/test_i2v_training.py; these
pin the pieces it is made of, against the host's own classes and functions.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image
from simpletuner.helpers.training import validation as host_validation
from simpletuner.helpers.training.state_tracker import StateTracker

from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host import family, patches


def eval_sample(image: Image.Image | None = None) -> host_validation.ValidationPrompt:
    """One sample as SimpleTuner 4.10.1's retrieve_validation_images returns it for an eval clip."""
    return host_validation.ValidationPrompt(
        shortname="longcat-video-val_0",
        prompt="a red square moves",
        type=host_validation.ValidationConditioningType.IMAGE,
        conditioning=image if image is not None else Image.new("RGB", (64, 64), (200, 0, 0)),
        image_path="/data/val/clips/clip_100.mp4",
        data_backend_id="longcat-video-val",
    )


def longcat_model(tmp_path: Path, **config) -> family.LongCatVideo:
    model = object.__new__(family.LongCatVideo)  # the hooks below read only the config
    model.config = SimpleNamespace(output_dir=str(tmp_path), **config)
    return model


@pytest.fixture
def eval_datasets(monkeypatch):
    """The eval clip dataset and its conditioning dataset as the host's StateTracker holds them."""
    lookups = []
    found = {}

    def get_conditioning_sample(path):
        lookups.append(path)
        return found.get(path)

    cond = {"id": "longcat-video-val-cond", "sampler": SimpleNamespace(get_conditioning_sample=get_conditioning_sample)}
    clips = {"metadata_backend": SimpleNamespace(instance_data_dir="/data/val/clips"), "conditioning_data": [cond]}
    monkeypatch.setattr(StateTracker, "data_backends", {"longcat-video-val": clips, cond["id"]: {}})
    return SimpleNamespace(lookups=lookups, found=found, clips=clips)


def test_an_eval_clip_is_paired_with_its_start_frame_prepared_as_training_prepares_it(
    tmp_path, eval_datasets, monkeypatch
):
    start = Image.new("RGB", (128, 128), (0, 200, 0))
    eval_datasets.found["clip_100.mp4"] = SimpleNamespace(
        image=start, image_path=lambda: "/data/val/frames/clip_100.png"
    )
    prepared = []

    def prepare_sample(image, data_backend_id, filepath, model):
        prepared.append((image, data_backend_id, filepath, model))
        return image.resize((64, 64)), (0, 0), 1.0

    monkeypatch.setattr("simpletuner.helpers.caching.vae.prepare_sample", prepare_sample)
    model = longcat_model(tmp_path, validation_using_datasets=True)
    (sample,) = model.pair_validation_start_frames([eval_sample()])
    assert eval_datasets.lookups == ["clip_100.mp4"]  # the relative path training's sampler looks up
    assert prepared == [(start, "longcat-video-val-cond", "/data/val/frames/clip_100.png", model)]
    assert np.array_equal(np.array(sample.conditioning), np.array(start.resize((64, 64))))
    assert sample.conditioning.info[family.START_FRAME_KEY] == "/data/val/frames/clip_100.png"
    assert (sample.prompt, sample.shortname) == ("a red square moves", "longcat-video-val_0")


def test_an_eval_clip_without_its_start_frame_is_refused_by_name(tmp_path, eval_datasets):
    model = longcat_model(tmp_path, validation_using_datasets=True)
    with pytest.raises(LongCatVideoError, match="clip_100.mp4.*validated from its paired start frame"):
        model.pair_validation_start_frames([eval_sample()])


def test_an_eval_dataset_without_conditioning_data_keeps_the_clip_frame(tmp_path, eval_datasets):
    eval_datasets.clips["conditioning_data"] = []
    clip_frame = Image.new("RGB", (64, 64), (200, 0, 0))
    (sample,) = longcat_model(tmp_path, validation_using_datasets=True).pair_validation_start_frames(
        [eval_sample(clip_frame)]
    )
    assert np.array_equal(np.array(sample.conditioning), np.array(clip_frame)) and not eval_datasets.lookups
    assert sample.conditioning.info[family.VALIDATION_SHORTNAME_KEY] == "longcat-video-val_0"


def test_a_start_image_given_by_path_is_kept(tmp_path, eval_datasets):
    given = Image.new("RGB", (64, 64), (1, 2, 3))
    sample = host_validation.ValidationPrompt(
        shortname="validation_input_0_start", prompt="p", conditioning=given, image_path="/my/start.png"
    )
    (kept,) = longcat_model(tmp_path, validation_using_datasets=True).pair_validation_start_frames([sample])
    assert np.array_equal(np.array(kept.conditioning), np.array(given)) and not eval_datasets.lookups
    assert kept.conditioning.info[family.VALIDATION_SHORTNAME_KEY] == "validation_input_0_start"


def test_the_wrapped_host_function_pairs_only_for_longcat(tmp_path, monkeypatch):
    host = SimpleNamespace(retrieve_validation_images=lambda: ["host samples"])
    patches.pair_validation_start_frames(host)
    patches.pair_validation_start_frames(host)  # wrapped once, however often the hook runs
    monkeypatch.setattr(StateTracker, "get_model", classmethod(lambda cls: object()))
    assert host.retrieve_validation_images() == ["host samples"]
    model = longcat_model(tmp_path)
    model.pair_validation_start_frames = lambda samples: [f"paired {s}" for s in samples]
    monkeypatch.setattr(StateTracker, "get_model", classmethod(lambda cls: model))
    assert host.retrieve_validation_images() == ["paired host samples"]


def test_the_start_image_is_saved_at_the_generated_size_beside_the_videos(tmp_path, monkeypatch):
    monkeypatch.setattr(StateTracker, "get_global_step", classmethod(lambda cls: 7))
    model = longcat_model(tmp_path)
    image = Image.new("RGB", (32, 48), (10, 20, 30))
    image.info[family.VALIDATION_SHORTNAME_KEY] = "longcat-video-val_0"
    kwargs = model.update_pipeline_call_kwargs({"image": [image], "width": 64, "height": 96})
    saved = tmp_path / "validation_images" / "step_7_longcat-video-val_0_64x96.start.png"
    assert kwargs["image"].size == (64, 96) and saved.is_file()
    assert np.array_equal(np.array(Image.open(saved)), np.array(kwargs["image"]))
    assert model.validation_video_sizes == {"longcat-video-val_0": (64, 96)}


def frames_of(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_video_files_are_named_for_what_they_hold(tmp_path, monkeypatch):
    from simpletuner.helpers.training import validation_video

    monkeypatch.setattr(StateTracker, "get_global_step", classmethod(lambda cls: 3))
    monkeypatch.setattr(validation_video, "save_videos", validation_video.save_videos)  # undone after the test
    patches.name_validation_videos_by_content(validation_video)
    config = SimpleNamespace(framerate=8, report_to="none", output_dir=str(tmp_path))
    collage = [Image.new("RGB", (202, 107), (0, 0, 255 - 20 * t)) for t in range(5)]
    bare = [Image.new("RGB", (64, 64), (255, 20 * t, 0)) for t in range(5)]
    images = {"val_0": [collage, bare]}
    model = longcat_model(tmp_path)
    model.validation_video_sizes = {"val_0": (64, 64)}
    monkeypatch.setattr(StateTracker, "get_model", classmethod(lambda cls: model))

    paths = validation_video.save_videos(str(tmp_path), images, "val_0", [(64, 64)], config)
    names = [Path(path).name for path in paths]
    assert names == ["step_3_val_0_0_64x64-stitched-208x112.mp4", "step_3_val_0_1_64x64.mp4"]
    stitched, plain = (frames_of(Path(path)) for path in paths)
    assert stitched[0].shape == (112, 208, 3) and plain[0].shape == (64, 64, 3)
    # Padded, not stretched: the collage keeps its pixels, the padding is black (2 pixels of
    # margin for the encoder's colour subsampling at the edge).
    assert np.abs(stitched[0][:107, :202].astype(int) - np.array(collage[0])).mean() < 3
    assert stitched[0][109:].max() < 20 and stitched[0][:, 204:].max() < 20
    assert images["val_0"][0] is collage  # what the host logs to its trackers stays unpadded

    monkeypatch.setattr(StateTracker, "get_model", classmethod(lambda cls: object()))
    (other,) = validation_video.save_videos(str(tmp_path), {"v": [collage]}, "v", [(64, 64)], config)
    assert Path(other).name == "step_3_v_0_64x64.mp4"  # another family: the host's name


def test_without_a_benchmark_the_start_image_is_stitched_beside_every_frame(tmp_path, monkeypatch):
    """disable_benchmark: true takes the host's input-only stitching, which takes one image per result."""
    shipped = host_validation.Validation.stitch_validation_input_image
    shipped = getattr(shipped, "_plugin_original", shipped)  # the plugin's start-up hook may have wrapped it
    monkeypatch.setattr(host_validation.Validation, "stitch_validation_input_image", shipped)  # undone after
    host = object.__new__(host_validation.Validation)
    start = Image.new("RGB", (48, 64), (0, 200, 0))
    video = [Image.new("RGB", (64, 64), (20 * t, 0, 0)) for t in range(3)]
    monkeypatch.setattr(StateTracker, "get_model", classmethod(lambda cls: longcat_model(tmp_path)))
    with pytest.raises(AttributeError, match="size"):  # the host's own function, as shipped
        host.stitch_validation_input_image(video, start, labels=["input", "step 3"])

    patches.stitch_start_image_beside_each_frame(host_validation.Validation)
    patches.stitch_start_image_beside_each_frame(host_validation.Validation)  # wrapped once
    frames = host.stitch_validation_input_image(video, start, labels=["input", "step 3"])
    assert len(frames) == 3 and all(frame.size == (48 + 5 + 64, 64) for frame in frames)
    for t, frame in enumerate(frames):  # the start image on the left, frame t on the right
        pixels = np.array(frame)
        assert tuple(pixels[40, 20]) == (0, 200, 0) and tuple(pixels[40, 48 + 5 + 40]) == (20 * t, 0, 0)

    monkeypatch.setattr(StateTracker, "get_model", classmethod(lambda cls: object()))
    with pytest.raises(AttributeError):  # another family: the host's behaviour, untouched
        host.stitch_validation_input_image(video, start)


def _colour_clip(frames: int, width: int, height: int) -> np.ndarray:
    """``[frames, H, W, 3]`` uint8, one flat colour per frame, every frame another colour."""
    colours = [(20 + 25 * t, 200 - 15 * t, (60 * t) % 256) for t in range(frames)]
    return np.stack([np.full((height, width, 3), colour, np.uint8) for colour in colours])


@pytest.mark.parametrize("generated_frames", [9, 13])
def test_a_continuation_eval_clip_is_continued_from_its_first_frames_and_saved_beside_the_result(
    tmp_path, monkeypatch, generated_frames
):
    from simpletuner_longcat_video import spec

    # The eval dataset as prepare_datasets leaves it: K = 5 in its video block, 9 frames kept.
    monkeypatch.setattr(
        StateTracker,
        "data_backends",
        {"cont-val": {"config": {"video": {"num_frames": 9, spec.CONDITION_FRAMES_KEY: 5}}}},
    )
    monkeypatch.setattr(StateTracker, "get_global_step", classmethod(lambda cls: 7))
    clip = _colour_clip(10, 32, 24)  # the host's training preparation of the clip (one frame more than kept)
    prepared = []

    def prepare_sample(image, data_backend_id, filepath, model):
        prepared.append((image, data_backend_id, filepath))
        return clip, (0, 0), 32 / 24

    monkeypatch.setattr("simpletuner.helpers.caching.vae.prepare_sample", prepare_sample)
    model = longcat_model(tmp_path, validation_using_datasets=True, framerate=8)
    sample = host_validation.ValidationPrompt(
        shortname="cont-val_0",
        prompt="a red square moves",
        type=host_validation.ValidationConditioningType.IMAGE,
        conditioning=Image.fromarray(clip[0]),  # the host's choice: the clip's first frame
        image_path="/data/val/clips/clip_300.mp4",
        data_backend_id="cont-val",
    )
    (paired,) = model.pair_validation_start_frames([sample])

    # The host resizes the start image to the validation size and hands it over as `image`.
    kwargs = model.update_pipeline_call_kwargs(
        {"image": [paired.conditioning.resize((64, 48))], "width": 64, "height": 48}
    )
    assert prepared == [(None, "cont-val", "/data/val/clips/clip_300.mp4")]  # read whole, as training prepares it
    assert "image" not in kwargs and kwargs["num_condition_frames"] == 5
    expected = [Image.fromarray(frame).resize((64, 48), Image.Resampling.LANCZOS) for frame in clip[:9]]
    assert [np.array(frame).tolist() for frame in kwargs["video"]] == [
        np.array(frame).tolist() for frame in expected[:5]
    ]
    assert model.supports_multistage_validation()

    generated = [Image.new("RGB", (64, 48), (250, 250 - 20 * t, 10 * t)) for t in range(generated_frames)]
    calls = []

    def pipeline_call(pipeline, call_kwargs):
        calls.append(call_kwargs)
        return SimpleNamespace(frames=[generated])

    model.pipeline = object()
    result = model.run_multistage_validation(kwargs, pipeline_call)
    assert result.frames[0] is generated and calls == [kwargs]
    model.run_multistage_validation(kwargs, lambda pipeline, call_kwargs: SimpleNamespace(frames=[generated[::-1]]))
    # A second call for the same sample (the host's EMA comparison) leaves the first result's file as it was.
    saved = tmp_path / "validation_images" / "step_7_cont-val_0_64x48.continued-beside-clip-128x48.mp4"
    frames = frames_of(saved)
    assert len(frames) == generated_frames and frames[0].shape == (48, 128, 3)
    for t, frame in enumerate(frames):
        left, right = frame[:, :64].astype(int), frame[:, 64:].astype(int)
        assert np.abs(left - np.array(generated[t])).mean() < 4, t
        truth = np.array(expected[t]) if t < 9 else np.zeros((48, 64, 3))  # the clip's 9 frames, then black
        assert np.abs(right - truth).mean() < 4, t
