"""End to end with the real host: `simpletuner train` on the tiny checkpoint and the tiny paired dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_demo

pytestmark = pytest.mark.slow

demo = load_demo()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("i2v-train")
    demo.prepare(workdir)
    code = demo.train(workdir, workdir / "train.log")
    log = (workdir / "train.log").read_text(errors="replace")
    return workdir, code, log, demo.summarise(workdir, log)


def test_training_run_completes_with_finite_losses(trained):
    workdir, code, log, result = trained
    assert code == 0, log[-3000:]
    assert len(result["losses"]) == demo.CONFIG_OVERRIDES["max_train_steps"]
    assert all(math.isfinite(loss) and loss > 0 for loss in result["losses"])
    assert "I2V pairing: 4 clips in 'longcat-video-train'" in log
    assert "flow_schedule_shift not set: using LongCat-Video's 12.0" in log
    assert json.loads((workdir / "output" / "simpletuner_config.json").read_text())["flow_schedule_shift"] == 12.0


def test_validation_video_is_image_to_video_with_the_configured_frames(trained):
    workdir, code, log, result = trained
    assert code == 0
    final = [name for name in result["videos"] if name.startswith(f"step_{demo.CONFIG_OVERRIDES['max_train_steps']}_")]
    assert final and all("longcat-video-val" in name for name in final), result["videos"]
    assert all(result["videos"][name] == demo.TINY_FRAMES for name in final)
    sampling = [line for line in log.splitlines() if "LongCat-Video sampling:" in line]
    assert sampling and all("image-to-video (start image in latent frame 0), 64x64, 9 frames" in s for s in sampling)


def test_lora_weights_reload_and_change_the_pipeline_output(trained):
    from safetensors.torch import load_file

    from simpletuner_longcat_video.pipeline import load_pipeline

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


def _run_with(tmp_path: Path, mutate) -> tuple[int, str]:
    demo.prepare(tmp_path)
    mutate(tmp_path)
    code = demo.train(tmp_path, tmp_path / "train.log")
    return code, (tmp_path / "train.log").read_text(errors="replace")


def test_missing_start_frame_stops_the_run_before_any_step(tmp_path):
    def drop_one(workdir: Path) -> None:
        (workdir / "datasets/longcat-video/train/start_frames/clip_002.png").unlink()

    code, log = _run_with(tmp_path, drop_one)
    assert code != 0
    assert "have no start frame in" in log and "clip_002" in log
    assert "step_loss" not in log


def test_bad_dataset_frame_count_is_named_by_the_host_run(tmp_path):
    def bad_frames(workdir: Path) -> None:
        path = workdir / "config" / "multidatabackend.json"
        datasets = json.loads(path.read_text())
        datasets[0]["video"]["num_frames"] = 8
        path.write_text(json.dumps(datasets))

    code, log = _run_with(tmp_path, bad_frames)
    assert code != 0
    assert "dataset 'longcat-video-train' video.num_frames = 8" in log and "use 5 or 9" in log
    assert "step_loss" not in log


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

    code, log = _run_with(tmp_path, text_to_video)
    assert code == 0, log[-3000:]
    losses = demo.summarise(tmp_path, log)["losses"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert "I2V pairing" not in log
    sampling = [line for line in log.splitlines() if "LongCat-Video sampling:" in line]
    assert sampling and all("text-to-video" in line for line in sampling)
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").is_file()
