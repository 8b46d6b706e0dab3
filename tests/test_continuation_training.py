"""One real `simpletuner train` with image-to-video, continuation and text-to-video datasets, and continuation validation.

The demo's tiny checkpoint and its I2V pair datasets (two clips kept), plus a continuation
dataset of 17-frame clips marked ``"longcat_condition_frames": 13`` beside its ``dataset_type``
(the form the WebUI keeps), a text-to-video dataset opted out with ``0``, and a continuation eval
split that takes its K from ``config.json``'s ``longcat_condition_frames: 13``. Six steps: one
epoch, so every training dataset gives exactly its two batches. The run is recorded
(tests/fault_injection/sitecustomize.py): every batch after the family's hook, every pipeline call.
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
from _host_run import cached_latent, demo, pipeline_calls, recorded_run
from PIL import Image

from simpletuner_longcat_video.testing.tiny import build_continuation_dataset

pytestmark = pytest.mark.slow

STEPS = 6
K = 13  # condition frames: 4 latent frames
CLIP_FRAMES = 17  # 5 latent frames: 4 condition + 1 generated
KINDS = {"longcat-video-train": "i2v", "cont-train": "continuation", "t2v-train": "t2v"}


def mixed_run(workdir: Path) -> None:
    """The demo's run, changed into the mixed one described in the module doc."""
    demo.prepare(workdir)
    data = workdir / "datasets" / "longcat-video" / "train"
    for name in ("clip_002", "clip_003"):  # two I2V pairs: two batches, as the other datasets
        for path in (
            data / "clips" / f"{name}.mp4",
            data / "clips" / f"{name}.txt",
            data / "start_frames" / f"{name}.png",
        ):
            path.unlink()
    cont = build_continuation_dataset(workdir / "datasets" / "cont" / "train", clips=2, frames=CLIP_FRAMES)
    val = build_continuation_dataset(workdir / "datasets" / "cont" / "val", clips=1, frames=CLIP_FRAMES, offset=300)
    t2v = build_continuation_dataset(workdir / "datasets" / "t2v", clips=2, frames=demo.TINY_FRAMES, offset=400)

    path = workdir / "config" / "multidatabackend.json"
    backends = {dataset["id"]: dataset for dataset in json.loads(path.read_text())}
    template = {key: value for key, value in backends["longcat-video-train"].items() if key != "conditioning_data"}

    def video(dataset_id: str, folder: Path, frames: int, **extra: object) -> dict:
        return {
            **template,
            "id": dataset_id,
            "instance_data_dir": str(folder),
            "cache_dir_vae": str(workdir / "cache" / "vae" / dataset_id),
            "video": {"num_frames": frames, "min_frames": frames},
            **extra,
        }

    datasets = [
        backends["longcat-video-train"],
        backends["longcat-video-cond"],
        video("cont-train", cont, CLIP_FRAMES, longcat_condition_frames=K),
        video("t2v-train", t2v, demo.TINY_FRAMES, longcat_condition_frames=0),
        video("cont-val", val, CLIP_FRAMES),
        backends["longcat-video-text-embeds"],
    ]
    path.write_text(json.dumps(datasets, indent=2))
    config_path = workdir / "config" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(
        eval_dataset_id="cont-val",
        longcat_condition_frames=K,
        max_train_steps=STEPS,
        checkpoint_step_interval=STEPS,
        validation_steps=STEPS,
        validation_num_video_frames=CLIP_FRAMES,
        validation_num_inference_steps=2,
    )
    config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("continuation")
    mixed_run(workdir)
    return workdir, *recorded_run(workdir)


def batches(workdir: Path) -> list[dict]:
    return [torch.load(path, weights_only=False) for path in sorted((workdir / "record").glob("batch_*.pt"))]


def read_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def eval_clip(workdir: Path, size: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    """The eval clip's frames at the validation size (the clips are 64x64: the host leaves them as they are)."""
    (path,) = sorted((workdir / "datasets" / "cont" / "val").glob("*.mp4"))
    return [np.array(Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS)) for frame in read_frames(path)]


def test_one_run_trains_image_to_video_continuation_and_text_to_video(trained):
    workdir, code, log, result = trained
    assert code == 0, log[-3000:]
    assert len(result["losses"]) == STEPS and all(math.isfinite(loss) and loss > 0 for loss in result["losses"])
    assert "'longcat-video-train' stays image-to-video" in log  # the config's K marks datasets without start frames
    assert "'cont-train': video continuation from each clip's first 13 frames (4 latent frames" in log
    assert "'cont-val': video continuation from each clip's first 13 frames" in log
    seen = {}
    for batch in batches(workdir):
        kind = KINDS[batch["data_backend_id"]]
        seen[kind] = seen.get(kind, 0) + 1
        count = {"i2v": 1, "continuation": 4, "t2v": 0}[kind]
        assert batch["num_cond_latents"] == count, batch["data_backend_id"]
        latents, noisy = batch["latents"], batch["noisy_latents"]
        # The condition frames clean (exact); every later frame noised per flow
        # matching, (1 - sigma) * latents + sigma * noise with sigma = t / 1000: the noise it implies
        # has unit variance in each of them.
        assert torch.equal(noisy[:, :, :count], latents[:, :, :count])
        sigma = float(batch["timesteps"][0]) / 1000
        implied = (noisy[:, :, count:] - (1 - sigma) * latents[:, :, count:]) / sigma
        assert all(0.7 < float(std) < 1.3 for std in implied.std(dim=(0, 1, 3, 4))), implied.std(dim=(0, 1, 3, 4))
        if count:
            assert torch.equal(batch["frame_timesteps"][:, :count], torch.zeros(1, count))
            assert bool((batch["frame_timesteps"][:, count:] > 0).all())
        if kind == "continuation":
            # The condition is the clip's own cached latents (the host's VAE cache of the whole clip), in
            # the training dtype (bf16 here).
            (clip,) = batch["files"]
            cached = cached_latent(workdir / "cache" / "vae" / "cont-train", Path(clip).stem)
            assert torch.equal(latents[0, :, :count], cached[:, :count].to(torch.bfloat16).float())
    assert seen == {"i2v": 2, "continuation": 2, "t2v": 2}, seen
    assert (workdir / "output" / "pytorch_lora_weights.safetensors").is_file()


def test_validation_continues_the_eval_clip_from_its_first_13_frames(trained):
    workdir, code, log, _ = trained
    assert code == 0, log[-3000:]
    calls = pipeline_calls(workdir)
    assert len(calls) == 2  # step 0 (the untrained model) and step 6
    clip = eval_clip(workdir)
    cached = cached_latent(workdir / "cache" / "vae" / "cont-val", "clip_300")
    for call in calls:
        assert call["image"] is None and call["num_condition_frames"] == K
        assert call["size"] == (64, 64, CLIP_FRAMES)
        assert len(call["video"]) == K
        for given, frame in zip(call["video"], clip[:K], strict=True):
            assert np.abs(given.astype(int) - frame.astype(int)).mean() < 2.0
        # The pipeline's condition latents (its encode of the 13 frames) are the eval clip's first 4
        # cached latents (the host's encode of the whole clip): the VAE is causal in time.
        condition = call["hidden_states"][0, :, :4]
        assert (condition - cached[:, :4].float()).abs().mean() < 0.05
    assert "cont-val_0: continues " in log and "from its first 13 of 17 frames" in log


def decoded_condition(pipe, call: dict) -> list[np.ndarray]:
    """The pipeline call's condition latents (what its DiT saw first) decoded as the call decodes: its autocast."""
    from simpletuner_longcat_video.core.pipeline import denormalize_latents

    latents = denormalize_latents(call["hidden_states"][:, :, :4], pipe.vae)
    precision = torch.autocast("cpu", dtype=call["autocast"]) if call["autocast"] else contextlib.nullcontext()
    with torch.no_grad(), precision:
        pixels = pipe.vae.decode(latents.to(call["vae_dtype"])).sample.float()
    return [np.asarray(frame) for frame in pipe.video_processor.postprocess_video(pixels, output_type="pil")[0]]


def test_the_continuation_is_saved_beside_the_eval_clip(trained):
    workdir, code, log, _ = trained
    assert code == 0, log[-3000:]
    folder = workdir / "output" / "validation_images"
    saved = sorted(folder.glob("*.continued-beside-clip-*.mp4"))
    names = [path.name for path in saved]
    assert names == [f"step_{step}_cont-val_0_64x64.continued-beside-clip-128x64.mp4" for step in (0, STEPS)]
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    clip, pipe = eval_clip(workdir), load_pipeline(str(workdir / "LongCat-Video-tiny"))
    for path, call in zip(saved, pipeline_calls(workdir), strict=True):
        frames = read_frames(path)
        assert len(frames) == CLIP_FRAMES and frames[0].shape == (64, 128, 3)
        for t, frame in enumerate(frames):
            right = frame[:, 64:].astype(int)
            assert np.abs(right - clip[t]).mean() < 3.0, (path.name, t)  # the ground truth, frame by frame
        # Left: the generated video, its first 13 frames the condition frames (decoded from their
        # latents; the tiny VAE's decoder is far from the clip, and another one under bf16 autocast).
        condition = decoded_condition(pipe, call)
        assert len(condition) == K
        for t in range(K):
            assert np.abs(frames[t][:, :64].astype(int) - condition[t]).mean() < 4.0, (path.name, t)
        assert np.abs(frames[K][:, :64].astype(int) - condition[-1]).mean() > 10, path.name  # then new frames
