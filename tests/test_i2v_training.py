"""End to end with the real host: `simpletuner train` on the demo's run, then what it shows.

The module's one host run is `make demo`'s (``demo.prepare(learning=True)``): the tiny checkpoint,
the edit-style learning dataset (each clip is the other colour than its start frame, so start
frames are never the clips' first frames) and ``LEARNING_OVERRIDES``. The start-frame files are
written at twice the clips' size so that resizing is on the path. The run is recorded (see
tests/fault_injection/sitecustomize.py) so validation's start image and latents and every training
batch can be checked; the LoRA it writes must pass the demo's learning check.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from _host_run import cached_latent, demo, pipeline_calls, recorded_run, run_host
from PIL import Image

pytestmark = pytest.mark.slow

VAL_CLIP = "clip_100"  # the validation split's one clip (tiny.build_learning_dataset)
STEPS = demo.LEARNING_OVERRIDES["max_train_steps"]


def first_frame(clip: Path) -> np.ndarray:
    with av.open(str(clip)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def enlarge_start_frames(workdir: Path) -> None:
    """Each start-frame file at 128x128 (its clip is 64x64): the host and validation resize it."""
    root = workdir / "datasets" / "longcat-video"
    for split in ("train", "val"):
        for start in (root / split / "start_frames").glob("*.png"):
            Image.open(start).resize((128, 128), Image.Resampling.NEAREST).save(start)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("i2v-train")
    demo.prepare(workdir, learning=True)
    enlarge_start_frames(workdir)
    return workdir, *recorded_run(workdir)


def expected_start_image(workdir: Path, split: str = "val", name: str = VAL_CLIP) -> np.ndarray:
    """The start-frame file at the 64x64 validation size."""
    path = workdir / "datasets" / "longcat-video" / split / "start_frames" / f"{name}.png"
    return np.array(Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS))


def assert_same_picture(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to the resampling filter (the host resizes with its own Lanczos)."""
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert actual.shape == expected.shape and diff.mean() < 2.0 and np.percentile(diff, 99) < 24, (
        f"mean {diff.mean():.1f}, p99 {np.percentile(diff, 99):.0f}"
    )


def test_training_run_completes_with_finite_losses(trained):
    workdir, code, log, result = trained
    assert code == 0, log[-3000:]
    assert len(result["losses"]) == STEPS
    assert all(math.isfinite(loss) and loss > 0 for loss in result["losses"])
    assert "I2V pairing: 2 clips in 'longcat-video-train'" in log
    assert "flow_schedule_shift not set: using LongCat-Video's 12.0" in log
    assert json.loads((workdir / "output" / "simpletuner_config.json").read_text())["flow_schedule_shift"] == 12.0


def test_validation_video_is_image_to_video_with_the_configured_frames(trained):
    workdir, code, log, result = trained
    assert code == 0
    final = [name for name in result["videos"] if name.startswith(f"step_{STEPS}_")]
    assert final and all("longcat-video-val" in name for name in final), result["videos"]
    assert all(result["videos"][name] == demo.TINY_FRAMES for name in final)
    sampling = [line for line in log.splitlines() if "LongCat-Video sampling:" in line]
    assert sampling and all("image-to-video (start image in latent frame 0), 64x64, 9 frames" in s for s in sampling)


def test_lora_weights_reload_and_change_the_pipeline_output(trained):
    from safetensors.torch import load_file

    from simpletuner_longcat_video.core.pipeline import load_pipeline

    workdir, code, _, result = trained
    assert code == 0 and result["lora"] is not None
    weights = load_file(str(result["lora"]))
    assert weights and all(key.startswith("transformer.") for key in weights)
    assert any(tensor.abs().sum() > 0 for key, tensor in weights.items() if "lora_B" in key)

    pipe = load_pipeline(str(workdir / "LongCat-Video-tiny"))
    kwargs = dict(
        prompt="a red square moves", height=64, width=64, num_frames=9, num_inference_steps=2, output_type="latent"
    )
    base = pipe(generator=torch.Generator().manual_seed(0), show_progress=False, **kwargs).frames
    pipe.load_lora_weights(str(result["lora"]))
    tuned = pipe(generator=torch.Generator().manual_seed(0), show_progress=False, **kwargs).frames
    assert (tuned - base).abs().max() > 1e-4


def test_the_lora_the_host_trained_learns_its_clips(trained):
    # The demo's own check: each training pair sampled image-to-video from its start frame and
    # caption with load_pipeline + the LoRA file the run wrote, compared with the clip's latents.
    workdir, code, _, result = trained
    assert code == 0 and result["lora"] is not None
    check = demo.check_learning(workdir, result["lora"])
    assert check.passed and check.every_pair_passed, check.table()


def test_text_to_video_dataset_still_trains(tmp_path):
    def text_to_video(workdir: Path) -> None:
        path = workdir / "config" / "multidatabackend.json"
        datasets = [
            d for d in json.loads(path.read_text()) if d["id"] in ("longcat-video-train", "longcat-video-text-embeds")
        ]
        datasets[0]["video"]["is_i2v"] = False
        datasets[0].pop("conditioning_data")
        path.write_text(json.dumps(datasets))
        config_path = workdir / "config" / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("eval_dataset_id")
        config.update(validation_using_datasets=False, validation_prompt="a red square moves", max_train_steps=2)
        config.update(validation_steps=2, checkpoint_step_interval=2)
        config_path.write_text(json.dumps(config))

    code, log = run_host(tmp_path, text_to_video)
    assert code == 0, log[-3000:]
    losses = demo.summarise(tmp_path, log)["losses"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert "I2V pairing" not in log
    sampling = [line for line in log.splitlines() if "LongCat-Video sampling:" in line]
    assert sampling and all("text-to-video" in line for line in sampling)
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").is_file()


def initial_latents(pipe, call: dict, image: np.ndarray) -> torch.Tensor:
    """What the recorded pipeline call's first step would see with ``image`` as its start image."""
    height, width, frames = call["size"]
    generator = torch.Generator().set_state(call["generator_state"])
    if pipe.vae.dtype != call["vae_dtype"]:
        pipe.vae.to(call["vae_dtype"])
    precision = torch.autocast("cpu", dtype=call["autocast"]) if call["autocast"] else contextlib.nullcontext()
    with precision:
        return pipe.prepare_latents(1, height, width, frames, Image.fromarray(image), generator)[0]


def test_validation_starts_from_the_eval_split_start_frame_and_saves_it(trained):
    workdir, code, log, _ = trained
    assert code == 0, log[-3000:]
    calls = pipeline_calls(workdir)
    i2v = [call for call in calls if call["image"] is not None]
    assert i2v and len(i2v) == len(calls), "every validation call is image-to-video"
    expected = expected_start_image(workdir)
    clip_frame = first_frame(workdir / "datasets" / "longcat-video" / "val" / "clips" / f"{VAL_CLIP}.mp4")
    for call in i2v:
        assert_same_picture(call["image"], expected)
        with pytest.raises(AssertionError):  # the host's own choice, the clip's first frame, fails this test
            assert_same_picture(call["image"], clip_frame)
    folder = workdir / "output" / "validation_images"
    saved = sorted(folder.glob("*.start.png"))
    steps = sorted({name.split("_")[1] for name in demo.summarise(workdir, log)["videos"]})
    assert [path.name for path in saved] == sorted(f"step_{step}_longcat-video-val_0_64x64.start.png" for step in steps)
    for path in saved:
        assert np.array_equal(np.array(Image.open(path).convert("RGB")), i2v[0]["image"])
    start_frame = workdir / "datasets" / "longcat-video" / "val" / "start_frames" / f"{VAL_CLIP}.png"
    assert f"start image = {start_frame} from 'longcat-video-val-cond'" in log


def test_validation_latent_frame_0_is_the_vae_draw_of_that_start_image(trained):
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    workdir, code, _, _ = trained
    assert code == 0
    pipe = load_pipeline(str(workdir / "LongCat-Video-tiny"))
    clip_frame = first_frame(workdir / "datasets" / "longcat-video" / "val" / "clips" / f"{VAL_CLIP}.mp4")
    for call in pipeline_calls(workdir):
        seen = call["hidden_states"]
        ours, clips = initial_latents(pipe, call, call["image"]), initial_latents(pipe, call, clip_frame)
        assert torch.equal(seen[:, :, 1:], ours[:, :, 1:])  # the same noise: the generator state matches
        assert torch.allclose(seen[:, :, :1], ours[:, :, :1], atol=1e-6)
        # Conditioning on the clip's first frame would be caught: its latent differs by far more.
        assert (seen[:, :, :1] - clips[:, :, :1]).abs().mean() > 1e-3


def test_training_latent_frame_0_is_the_paired_start_frame_latent(trained):
    workdir, code, _, _ = trained
    assert code == 0
    cache = workdir / "cache" / "vae" / "longcat-video" / "train"
    names = sorted(path.stem for path in (workdir / "datasets" / "longcat-video" / "train" / "clips").glob("*.mp4"))
    start_frames = {name: cached_latent(cache / "start_frames", name)[:, :1] for name in names}
    batches = sorted((workdir / "record").glob("batch_*.pt"))
    assert len(batches) == STEPS
    for path in batches:
        batch = torch.load(path, weights_only=False)
        (clip,) = batch["files"]
        frame0, name = batch["frame0"][0], Path(clip).stem
        # The batch holds its latents in the training dtype (bf16 here): equal up to that rounding.
        assert torch.allclose(frame0, start_frames[name], rtol=1e-2, atol=1e-2), clip
        others = [(frame0 - latent).abs().mean() for other, latent in start_frames.items() if other != name]
        clip_frame0 = cached_latent(cache / "clips", name)[:, :1]
        assert min([*others, (frame0 - clip_frame0).abs().mean()]) > 10 * (frame0 - start_frames[name]).abs().mean()


def test_validation_video_file_is_named_for_what_it_holds(trained):
    workdir, code, _, result = trained
    assert code == 0
    sizes = {}
    for name in result["videos"]:
        generated, _, stitched = name.removesuffix(".mp4").rsplit("_", 1)[1].partition("-stitched-")
        with av.open(str(workdir / "output" / "validation_images" / name)) as container:
            frame = next(container.decode(video=0))
        assert generated == "64x64"
        sizes[name] = (stitched or generated, f"{frame.width}x{frame.height}")
    # Step 0 holds the untrained model's video alone; later steps the host's stitched preview.
    assert all(named == actual for named, actual in sizes.values()), sizes
    assert any("-stitched-" in name for name in sizes) and any("-stitched-" not in name for name in sizes), sizes
