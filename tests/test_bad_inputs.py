"""The bad-input matrix: every bad input is refused with its value, file/field, rule and fix.

Rows go through the code a user's run goes through: the family's config hooks, the dataset rules
on host-shaped records with real files, the checkpoint loaders on a broken tiny checkpoint, and
(marked slow) the real `simpletuner train`, asserting that nothing was trained. The row for
`musubi_blocks_to_swap` lives with its check.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _host_run import assert_nothing_trained, edit_json, run_host
from conftest import run_python
from PIL import Image
from safetensors.torch import load_file, save_file

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core.pipeline import check_video_size, load_pipeline
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host import discovery
from simpletuner_longcat_video.host.datasets import check_datasets, check_training_config, prepare_datasets
from simpletuner_longcat_video.host.family import LongCatVideo
from simpletuner_longcat_video.testing.tiny import build_tiny_dataset, synthetic_clip, write_video


def assert_named(error: BaseException, *, where: str, value: str, rule: str, fix: str) -> None:
    """Our error, and its message names the field/file, the value, the rule and the fix."""
    assert isinstance(error, LongCatVideoError), f"{type(error).__name__}: {error}"
    text = str(error)
    head, _, fix_text = text.rpartition("Fix: ")
    assert where in head, (where, text)
    assert value in head, (value, text)
    assert rule in head, (rule, text)
    assert fix in fix_text, (fix, text)


def refusal(call, *args, **kwargs) -> LongCatVideoError:
    with pytest.raises(Exception) as info:
        call(*args, **kwargs)
    return info.value


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "where", "value", "rule", "fix"),
    [
        pytest.param(
            {"validation_num_video_frames": 82},
            "validation_num_video_frames",
            "82",
            "(frames - 1) % 4 == 0",
            "use 81 or 85",
            id="frames-not-4k+1",
        ),
        pytest.param(
            {"validation_resolution": "830x480"},
            "validation_resolution",
            "'830x480'",
            "must be divisible by 16",
            "WIDTHxHEIGHT on the 16 px grid",
            id="width-not-divisible-by-16",
        ),
        pytest.param(
            {"validation_resolution": "832x472"},
            "validation_resolution",
            "'832x472'",
            "must be divisible by 16",
            "use e.g. 832x480",
            id="height-not-divisible-by-16",
        ),
        pytest.param(
            {"aspect_bucket_alignment": 24},
            "aspect_bucket_alignment",
            "24",
            "must divide by 16",
            '"aspect_bucket_alignment": 16',
            id="bucket-alignment-24",
        ),
        pytest.param(
            {"aspect_bucket_alignment": 128},
            "aspect_bucket_alignment",
            "128",
            "must divide by 16",
            '"aspect_bucket_alignment": 16',
            id="bucket-alignment-128",
        ),
    ],
)
def test_config_row(settings, where, value, rule, fix):
    error = refusal(check_training_config, SimpleNamespace(**settings))
    assert_named(error, where=where, value=value, rule=rule, fix=fix)


def test_wrong_flavour_row():
    # The family's own hook, called as the host calls it; it refuses before the host's lookup.
    family = SimpleNamespace(config=SimpleNamespace(model_flavour="i2v-480p"))
    error = refusal(LongCatVideo.setup_model_flavour, family)
    assert_named(
        error,
        where="model_flavour",
        value="'i2v-480p'",
        rule="has the flavours ['final']",
        fix='"model_flavour": "final"',
    )


def test_pipeline_size_row():
    error = refusal(check_video_size, 100, 64, 9)
    assert_named(error, where="pipeline call: width x height", value="64x100", rule="divisible by 16", fix="use e.g.")


# --- datasets (host-shaped records over real files) ------------------------------------------


class Metadata:
    """What the rules read from a host metadata backend: the bucketed files and per-file metadata."""

    def __init__(self, files: list[Path]) -> None:
        self.aspect_ratio_bucket_indices = {"1.0": [str(path) for path in files]}
        self.image_metadata = {str(path): {} for path in files}

    def get_metadata_by_filepath(self, path: str) -> dict | None:
        return self.image_metadata.get(path)


SOURCE = "config/multidatabackend.json"


def records(
    clip_dir: Path, frame_dir: Path, *, used_clips=None, used_frames=None, num_frames: int = 9, min_frames: int = 9
) -> dict:
    """The host's records for a paired dataset; by default it uses every file on disk."""
    clips = used_clips if used_clips is not None else sorted(clip_dir.glob("*.mp4"))
    frames = used_frames if used_frames is not None else sorted(p for p in frame_dir.iterdir() if p.suffix != ".txt")
    cond = {
        "id": "longcat-video-cond",
        "dataset_type": "conditioning",
        "config": {"instance_data_dir": str(frame_dir)},
        "metadata_backend": Metadata(frames),
    }
    clip = {
        "id": "longcat-video-train",
        "dataset_type": "video",
        "config": {
            "instance_data_dir": str(clip_dir),
            "caption_strategy": "textfile",
            "video": {"num_frames": num_frames, "min_frames": min_frames, "is_i2v": True},
        },
        "metadata_backend": Metadata(clips),
        "conditioning_data": [cond],
    }
    return {"longcat-video-train": clip, "longcat-video-cond": cond}


@pytest.fixture
def paired(tmp_path):
    folders = build_tiny_dataset(tmp_path / "data", clips=3, val_clips=0, frames=9)
    return folders["train_clips"], folders["train_start_frames"]


def dataset_refusal(data: dict) -> LongCatVideoError:
    return refusal(check_datasets, SimpleNamespace(data_backend_config=SOURCE), data)


def test_healthy_paired_dataset_passes(paired):
    check_datasets(SimpleNamespace(data_backend_config=SOURCE), records(*paired))


def test_missing_start_frame_row(paired):
    clips, frames = paired
    (frames / "clip_001.png").unlink()
    error = dataset_refusal(records(clips, frames))
    assert_named(
        error,
        where=f"{SOURCE}: datasets 'longcat-video-train' (is_i2v) and 'longcat-video-cond' (conditioning)",
        value="'3 clips, 2 start frames'",
        rule=f"1 clip(s) in {clips} have no start frame in {frames}: clip_001",
        fix="add or rename the start frames",
    )


def test_start_frame_without_clip_row(paired):
    clips, frames = paired
    Image.new("RGB", (64, 64)).save(frames / "clip_009.png")
    error = dataset_refusal(records(clips, frames))
    assert_named(
        error,
        where="'longcat-video-cond' (conditioning)",
        value="'3 clips, 4 start frames'",
        rule=f"1 start frame(s) in {frames} have no clip in {clips}: clip_009",
        fix="or remove the unmatched files",
    )


def test_name_differing_in_case_row(paired):
    clips, frames = paired
    (frames / "clip_002.png").rename(frames / "Clip_002.png")
    error = dataset_refusal(records(clips, frames))
    assert_named(
        error,
        where="'longcat-video-cond' (conditioning)",
        value="'3 clips, 3 start frames'",
        rule="names that differ only in letter case (clip_002 vs Clip_002) do not pair",
        fix="add or rename the start frames",
    )


@pytest.mark.parametrize("suffix", [".jpg", ".PNG"])
def test_start_frame_extension_row(paired, suffix):
    # Host records that did not pass through prepare_datasets (which hands the host PNG copies).
    clips, frames = paired
    Image.open(frames / "clip_000.png").convert("RGB").save(frames / f"clip_000{suffix}", format="PNG")
    (frames / "clip_000.png").unlink()
    error = dataset_refusal(records(clips, frames))
    assert_named(
        error,
        where="dataset 'longcat-video-cond' (conditioning)",
        value=f"clip_000{suffix}",
        rule="reach SimpleTuner as <clip name>.png, lower-case suffix",
        fix=f"`mogrify -format png {frames}/*{suffix}`",
    )


def test_dataset_frame_count_row(paired):
    # min_frames 93: valid and >= num_frames (as the host requires), so this row is one problem.
    error = dataset_refusal(records(*paired, num_frames=90, min_frames=93))
    assert_named(
        error,
        where=f"{SOURCE}: dataset 'longcat-video-train' video.num_frames",
        value="90",
        rule="(frames - 1) % 4 == 0",
        fix="use 89 or 93",
    )


def _broken(kind: str, path: Path) -> None:
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero-length":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("corrupt", "cannot be decoded (corrupt or truncated"),
        ("truncated", "cannot be decoded (corrupt or truncated"),
        ("zero-length", "is empty (0 bytes)"),
    ],
)
def test_unreadable_clip_row(paired, kind, reason):
    clips, frames = paired
    _broken(kind, clips / "clip_001.mp4")
    # What the host does with such a clip: logs an error and leaves it out of its bucket lists.
    used = [clips / "clip_000.mp4", clips / "clip_002.mp4"]
    error = dataset_refusal(records(clips, frames, used_clips=used))
    assert_named(
        error,
        where=f"{SOURCE}: dataset 'longcat-video-train' ({clips})",
        value=f"clip_001.mp4 {reason}",
        rule="every clip must decode",
        fix="re-encode or replace the broken files",
    )
    # Refused once, as broken: not again as a start frame "without a clip".
    assert "have no clip" not in str(error)


def test_clip_shorter_than_num_frames_row(paired):
    clips, frames = paired
    write_video(clips / "clip_002.mp4", synthetic_clip(2, frames=6, height=64, width=64))
    used = [clips / "clip_000.mp4", clips / "clip_001.mp4"]  # the host's min_frames filter drops it silently
    error = dataset_refusal(records(clips, frames, used_clips=used))
    assert_named(
        error,
        where=f"{SOURCE}: dataset 'longcat-video-train' ({clips})",
        value="clip_002.mp4 has 6 frames (needs 9)",
        rule="have at least min_frames = 9 frames",
        fix="lower video.num_frames and video.min_frames to 5",
    )


@pytest.mark.parametrize("caption", ["", "  \n\n \t"])
def test_empty_caption_row(paired, caption):
    clips, frames = paired
    (clips / "clip_002.txt").write_text(caption)
    error = dataset_refusal(records(clips, frames))
    assert_named(
        error,
        where=f"dataset 'longcat-video-train' ({clips}) caption files",
        value="clip_002.txt",
        rule="caption files must not be empty",
        fix="write a caption into each file",
    )


def test_image_dataset_marked_i2v_row(paired):
    _, frames = paired
    data = {
        "stills": {
            "id": "stills",
            "dataset_type": "image",
            "config": {"instance_data_dir": str(frames), "video": {"is_i2v": True}},
            "metadata_backend": Metadata(sorted(frames.glob("*.png"))),
        }
    }
    error = dataset_refusal(data)
    assert_named(
        error,
        where=f"{SOURCE}: dataset 'stills' is_i2v",
        value="dataset_type 'image'",
        rule="is_i2v marks a dataset of video clips",
        fix='make it "dataset_type": "video"',
    )


def test_video_dataset_of_images_row(paired):
    clips, frames = paired
    data = records(frames, frames, used_clips=sorted(frames.glob("*.png")))
    data["longcat-video-train"].pop("conditioning_data")
    error = dataset_refusal(data)
    assert_named(
        error,
        where=f"dataset 'longcat-video-train' ({frames})",
        value="clip_000.png",
        rule="a video dataset must hold video clips",
        fix="put the clips (.mp4, ...) there",
    )


def test_several_problems_are_named_together(paired):
    clips, frames = paired
    (clips / "clip_000.txt").write_text("")
    (frames / "clip_001.png").unlink()
    error = dataset_refusal(records(clips, frames))
    assert_named(error, where=SOURCE, value="'2 problems'", rule="the datasets break several rules", fix="fix each one")
    assert "1. " in str(error) and "caption files must not be empty" in str(error)
    assert "2. " in str(error) and "have no start frame" in str(error)


# --- datasets as multidatabackend.json gives them, before the host configures anything ----------


def config_file(clip_dir: Path, frame_dir: Path, *, num_frames: int = 9, **clip_settings) -> list[dict]:
    """A paired dataset as the user writes it (and as SimpleTuner's loader returns it)."""
    clips = {
        "id": "longcat-video-train",
        "type": "local",
        "dataset_type": "video",
        "instance_data_dir": str(clip_dir),
        "caption_strategy": "textfile",
        "video": {"num_frames": num_frames, "min_frames": num_frames, "is_i2v": True},
        "conditioning_data": ["longcat-video-cond"],
        **clip_settings,
    }
    frames = {
        "id": "longcat-video-cond",
        "type": "local",
        "dataset_type": "conditioning",
        "instance_data_dir": str(frame_dir),
    }
    return [clips, frames]


def early_refusal(datasets: list[dict], tmp_path: Path) -> LongCatVideoError:
    config = SimpleNamespace(data_backend_config=SOURCE, cache_dir=str(tmp_path / "cache"), framerate=8)
    return refusal(prepare_datasets, config, datasets)


def test_start_frame_of_another_aspect_ratio_row(paired, tmp_path):
    clips, frames = paired
    Image.new("RGB", (64, 48)).save(frames / "clip_002.png")
    error = early_refusal(config_file(clips, frames), tmp_path)
    assert_named(
        error,
        where=f"{SOURCE}: datasets 'longcat-video-train' (is_i2v) and 'longcat-video-cond' (conditioning)",
        value="clip_002.png is 64x48 (aspect 1.33), clip_002.mp4 is 64x64 (aspect 1.0)",
        rule="a start frame must have its clip's aspect ratio (width / height to 2 decimals",
        fix="crop or pad each start frame to its clip's aspect ratio",
    )


def test_several_start_frames_for_one_clip_row(paired, tmp_path):
    clips, frames = paired
    Image.open(frames / "clip_001.png").convert("RGB").save(frames / "clip_001.jpg")
    error = early_refusal(config_file(clips, frames), tmp_path)
    assert_named(
        error,
        where="'longcat-video-cond' (conditioning)",
        value="'3 clips, 3 start frames'",
        rule="1 clip(s) have several start frames: clip_001.jpg and clip_001.png",
        fix="or remove the unmatched files",
    )


def test_every_clip_shorter_than_num_frames_row(paired, tmp_path):
    clips, frames = paired
    error = early_refusal(config_file(clips, frames, num_frames=13), tmp_path)
    assert_named(
        error,
        where=f"{SOURCE}: dataset 'longcat-video-train' ({clips})",
        value="'3 clip(s) of 9 frames'",
        rule="every clip is shorter than min_frames = 13, so there is no sample to train on",
        fix="set video.num_frames and video.min_frames to 9",
    )


def test_missing_caption_file_row(paired, tmp_path):
    clips, frames = paired
    (clips / "clip_001.txt").unlink()
    error = early_refusal(config_file(clips, frames), tmp_path)
    assert_named(
        error,
        where=f"dataset 'longcat-video-train' ({clips}) caption files",
        value="clip_001.txt",
        rule="with caption_strategy textfile every clip needs its caption file <clip name>.txt",
        fix="write the caption files",
    )


def test_conditioning_data_naming_no_dataset_row(paired, tmp_path):
    clips, frames = paired
    datasets = config_file(clips, frames)
    datasets[0]["conditioning_data"] = ["longcat-video-start"]
    error = early_refusal(datasets, tmp_path)
    assert_named(
        error,
        where=f"{SOURCE}: dataset 'longcat-video-train' conditioning_data",
        value="longcat-video-start",
        rule="names no dataset of this config",
        fix='"conditioning_data": ["longcat-video-cond"]',
    )


def test_is_i2v_set_twice_differently_row(paired, tmp_path):
    clips, frames = paired
    datasets = config_file(clips, frames)
    datasets[0]["video"]["is_i2v"] = False
    datasets[0]["is_i2v"] = True
    error = early_refusal(datasets, tmp_path)
    assert_named(
        error,
        where=f"{SOURCE}: dataset 'longcat-video-train' is_i2v",
        value="True beside dataset_type, False in video",
        rule="the two is_i2v settings disagree",
        fix='"video": {"is_i2v": true, ...}',
    )


def test_block_sparse_without_cuda_row(monkeypatch):
    from simpletuner_longcat_video.core import attention_bsa
    from simpletuner_longcat_video.host.settings import attention_options_from_config

    monkeypatch.setattr(attention_bsa.torch.cuda, "is_available", lambda: False)
    error = refusal(attention_options_from_config, SimpleNamespace(attention_implementation="block_sparse"))
    assert_named(
        error,
        where="attention_implementation",
        value="'block_sparse'",
        rule="the block-sparse kernels are Triton kernels for CUDA GPUs; this machine has none (no CUDA device",
        fix='use "auto"',
    )


# --- checkpoint (the loaders a user's download goes through) ---------------------------------


@pytest.fixture
def broken_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    copy = tmp_path / "LongCat-Video"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


@pytest.mark.parametrize("folder", ["dit", "vae"])
def test_checkpoint_missing_folder_row(broken_checkpoint, folder):
    shutil.rmtree(broken_checkpoint / folder)
    error = refusal(load_pipeline, str(broken_checkpoint))
    assert_named(
        error,
        where=f"pretrained_model_name_or_path ({broken_checkpoint})",
        value=str(broken_checkpoint),
        rule=f"missing: ['{folder}']",
        fix="download the complete meituan-longcat/LongCat-Video checkpoint",
    )


def _edit_dit(checkpoint: Path, edit) -> str:
    path = checkpoint / "dit" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    key = sorted(weights)[5]
    edit(weights, key)
    save_file(weights, str(path))
    return key


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("missing", "1 missing: {key}"),
        ("unexpected", "1 unexpected: lora_unet.extra"),
        ("renamed", "1 missing: {key}; 1 unexpected: model.{key}"),
    ],
)
def test_dit_keys_row(broken_checkpoint, change, named):
    def edit(weights, key):
        if change == "missing":
            weights.pop(key)
        elif change == "unexpected":
            weights["lora_unet.extra"] = torch.zeros(2)
        else:
            weights[f"model.{key}"] = weights.pop(key)

    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel

    LongCatVideoTransformer3DModel.check_weight_names(str(broken_checkpoint))  # intact: passes
    key = _edit_dit(broken_checkpoint, edit)
    # The same refusal from the load and from the header check run before anything is cached.
    for check in (load_pipeline, LongCatVideoTransformer3DModel.check_weight_names):
        error = refusal(check, str(broken_checkpoint))
        assert_named(
            error,
            where=f"DiT weights in {broken_checkpoint}/dit",
            value=named.format(key=key),
            rule="must hold exactly the official LongCat-Video parameter names",
            fix="use the unmodified dit/ folder",
        )


def test_dit_wrong_shape_row(broken_checkpoint):
    key = _edit_dit(broken_checkpoint, lambda weights, key: weights.__setitem__(key, torch.zeros(3, 3)))
    error = refusal(load_pipeline, str(broken_checkpoint))
    assert_named(
        error,
        where=f"DiT weights in {broken_checkpoint}/dit",
        value=f"{key} expected shape",
        rule="every tensor must have the shape the DiT's config.json gives it",
        fix="keep the config.json that was saved with these weights",
    )
    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel

    header = refusal(LongCatVideoTransformer3DModel.check_weight_names, str(broken_checkpoint))
    assert_named(
        header,
        where=f"DiT weights in {broken_checkpoint}/dit",
        value=f"1 of another shape, e.g. {key} is [3, 3], expected [",
        rule="every tensor must have the shape the DiT's config.json gives it",
        fix="keep the config.json that was saved with these weights",
    )


def _t5_encoder(folder: Path) -> str:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5EncoderModel(config).save_pretrained(folder)
    return "'t5'"


def _qwen_vl_config(folder: Path) -> str:
    # The design card's encoder; its config alone is what the check reads, before any weight.
    (folder / "config.json").write_text(
        json.dumps({"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]})
    )
    return "'qwen2_5_vl'"


@pytest.mark.parametrize("make", [_t5_encoder, _qwen_vl_config])
def test_text_encoder_of_the_wrong_class_row(broken_checkpoint, make):
    folder = broken_checkpoint / "text_encoder"
    shutil.rmtree(folder)
    folder.mkdir()
    model_type = make(folder)
    error = refusal(load_pipeline, str(broken_checkpoint))
    assert_named(
        error,
        where=f"{folder}/config.json",
        value=f"model_type {model_type}",
        rule="LongCat-Video's text encoder is umT5-XXL (UMT5EncoderModel, model_type 'umt5')",
        fix="put the official text_encoder/ of meituan-longcat/LongCat-Video there",
    )


# --- host version ----------------------------------------------------------------------------


def test_host_version_outside_range_row():
    installed = metadata.version("simpletuner")
    fake = SimpleNamespace(
        requires=["simpletuner>=4.11,<4.12"], metadata={"Name": "simpletuner-longcat-video"}, version="9.9.9"
    )
    message = discovery._check_host_version(fake)
    assert message is not None
    assert "plugin simpletuner-longcat-video 9.9.9" in message  # where: the plugin and its requirement
    assert f"simpletuner {installed} is installed" in message  # value
    assert "supports simpletuner<4.12,>=4.11" in message  # rule
    assert "pip install 'simpletuner<4.12,>=4.11'" in message  # fix


def test_host_version_outside_range_skips_the_family_in_a_real_registry():
    # The installed host reports a version outside the declared range: the real registry start-up
    # refuses the family and says why.
    code = textwrap.dedent(
        """
        import importlib.metadata as metadata
        real_version = metadata.version
        metadata.version = lambda name: "4.20.0" if name == "simpletuner" else real_version(name)
        from simpletuner.helpers.models.registry import ModelRegistry
        from simpletuner_longcat_video.host import discovery
        print("ours:", "longcat_video" in discovery.STATE.targets)
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "ours: False" in result.stdout
    line = next(line for line in result.stderr.splitlines() if "simpletuner-longcat-video 0.1.0:" in line)
    assert "entry point 'longcat_video = simpletuner_longcat_video.host.family:LongCatVideo'" in line
    assert "but simpletuner 4.20.0 is installed" in line and "pip install 'simpletuner<4.11,>=4.10.1'" in line
    assert "the host continues without it" in line


# --- the real host: `simpletuner train` stops before the first step ---------------------------


def _break_datasets(workdir: Path) -> None:
    """Thirteen bad rows at once (and one that is fine now); the plugin names all of them in one error."""
    train = workdir / "datasets/longcat-video/train"
    val = workdir / "datasets/longcat-video/val"
    shorts = workdir / "datasets/shorts"

    def add_clip(folder: Path, name: str, frames: int = 9, start_frame: bool = True) -> Path:
        video = synthetic_clip(len(name), frames=frames, height=64, width=64)
        path = write_video(folder / "clips" / f"{name}.mp4", video)
        (folder / "clips" / f"{name}.txt").write_text("a red square moves")
        if start_frame:
            (folder / "start_frames").mkdir(parents=True, exist_ok=True)
            Image.fromarray(video[0]).save(folder / "start_frames" / f"{name.lower()}.png")
        return path

    _broken("corrupt", add_clip(train, "clip_010"))
    _broken("truncated", add_clip(train, "clip_011"))
    _broken("zero-length", add_clip(train, "clip_012"))
    add_clip(train, "clip_013", frames=6)
    (train / "clips/clip_000.txt").write_text("")
    # Accepted now (read from a PNG copy): must not be among the problems.
    (train / "start_frames/clip_001.png").rename(train / "start_frames/clip_001.PNG")
    Image.new("RGB", (64, 48)).save(train / "start_frames/clip_002.png")  # another aspect ratio than its clip
    add_clip(val, "clip_101", start_frame=False)
    Image.new("RGB", (64, 64)).save(val / "start_frames/clip_102.png")
    add_clip(val, "Clip_103")
    for index in range(2):
        add_clip(shorts, f"short_{index}", frames=5, start_frame=False)

    stills = workdir / "datasets/stills"
    stills.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (index * 90, 40, 40)).save(stills / f"still_{index}.png")
        (stills / f"still_{index}.txt").write_text("a red square")

    def edit(datasets: list) -> None:
        by_id = {dataset["id"]: dataset for dataset in datasets}
        by_id["longcat-video-val"]["video"].update(num_frames=8, min_frames=9)
        shared = {key: by_id["longcat-video-train"][key] for key in ("type", "caption_strategy", "resolution")}
        shared.update({key: by_id["longcat-video-train"][key] for key in ("resolution_type", "minimum_image_size")})
        datasets.insert(
            1,
            {
                **shared,
                "id": "stills",
                "dataset_type": "image",
                "instance_data_dir": str(stills),
                "cache_dir_vae": str(workdir / "cache/vae/stills"),
                "video": {"is_i2v": True},
            },
        )
        datasets.insert(
            2,
            {
                **shared,
                "id": "shorts",
                "dataset_type": "video",
                "instance_data_dir": str(shorts / "clips"),
                "cache_dir_vae": str(workdir / "cache/vae/shorts"),
                "video": {"num_frames": 9, "min_frames": 9},
            },
        )

    edit_json(workdir / "config/multidatabackend.json", edit)


@pytest.mark.slow
def test_bad_datasets_stop_the_real_host_before_anything_is_cached(tmp_path):
    code, log = run_host(tmp_path, _break_datasets)
    assert_nothing_trained(tmp_path, code, log)
    train, val = (tmp_path / f"datasets/longcat-video/{split}" for split in ("train", "val"))
    source = tmp_path / "config/multidatabackend.json"
    expected = [
        f"{source} = '7 problems': the datasets break several rules:",
        "dataset 'stills' is_i2v = \"dataset_type 'image'\": is_i2v marks a dataset of video clips",
        f"dataset 'shorts' ({tmp_path / 'datasets/shorts/clips'}) = '2 clip(s) of 5 frames': every clip is shorter "
        "than min_frames = 9, so there is no sample to train on",
        "set video.num_frames and video.min_frames to 5",
        f"dataset 'longcat-video-train' ({train / 'clips'}) = ",
        "clip_010.mp4 cannot be decoded (corrupt or truncated",
        "clip_011.mp4 cannot be decoded (corrupt or truncated",
        "clip_012.mp4 is empty (0 bytes)",
        "clip_013.mp4 has 6 frames (needs 9)",
        "lower video.num_frames and video.min_frames to 5",
        f"dataset 'longcat-video-train' ({train / 'clips'}) caption files = 'clip_000.txt': caption files must not be "
        "empty",
        "'clip_002.png is 64x48 (aspect 1.33), clip_002.mp4 is 64x64 (aspect 1.0)': a start frame must have its "
        "clip's aspect ratio",
        "dataset 'longcat-video-val' video.num_frames = 8: LongCat-Video needs (frames - 1) % 4 == 0",
        "use 5 or 9",
        f"2 clip(s) in {val / 'clips'} have no start frame in {val / 'start_frames'}: Clip_103, clip_101",
        f"2 start frame(s) in {val / 'start_frames'} have no clip in {val / 'clips'}: clip_102, clip_103",
        "names that differ only in letter case (Clip_103 vs clip_103) do not pair",
        "Fix: fix each one as its own 'Fix:' says; nothing was trained",
    ]
    for text in expected:
        assert text in log, text
    assert "clip_001.PNG" not in log
    # Refused before the host configured a dataset: no latent, no text embedding, no bucket list.
    assert not [path for path in tmp_path.rglob("*.pt") if "LongCat-Video-tiny" not in path.parts]
    assert not list((tmp_path / "datasets").rglob("aspect_ratio_bucket_indices_*.json"))


@pytest.mark.slow
def test_dit_with_a_missing_key_stops_the_real_host(tmp_path):
    removed = []

    def drop_key(workdir: Path) -> None:
        removed.append(_edit_dit(workdir / "LongCat-Video-tiny", lambda weights, key: weights.pop(key)))

    code, log = run_host(tmp_path, drop_key)
    assert_nothing_trained(tmp_path, code, log)
    assert f"DiT weights in {tmp_path / 'LongCat-Video-tiny'}/dit = '1 missing: {removed[0]}'" in log
    # Stopped at the first load: the host's retry without low_cpu_mem_usage (which would fill
    # the weight with random values) never ran.
    assert "disabling low_cpu_mem_usage and retrying" not in log


@pytest.mark.slow
def test_text_encoder_of_the_wrong_class_stops_the_real_host(tmp_path):
    def swap_encoder(workdir: Path) -> None:
        folder = workdir / "LongCat-Video-tiny" / spec.TEXT_ENCODER_SUBFOLDER
        shutil.rmtree(folder)
        _t5_encoder(folder)

    code, log = run_host(tmp_path, swap_encoder)
    assert_nothing_trained(tmp_path, code, log)
    folder = tmp_path / "LongCat-Video-tiny" / "text_encoder"
    assert f"{folder}/config.json = \"model_type 't5', architectures ['T5EncoderModel']\"" in log
    assert "LongCat-Video's text encoder is umT5-XXL" in log
