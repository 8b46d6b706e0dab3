"""A user's own data, written the way the quickstart and the seed say, through the real `simpletuner train`.

One run covers what users write and the project's own configs did not: the shipped
`examples/multidatabackend.json` with its relative paths, run from the folder holding `config/`;
the training dataset in the seed's form (`"is_i2v": true` beside `dataset_type`); edit-style start
frames that differ from the clips' first frames, one clip each in PNG, JPEG, WEBP, BMP and `.JPG`;
and a clip of another size and frame count whose treatment the log must state. Only sizes, steps
and the checkpoint are changed for a CPU, as `make demo` changes them.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import re
import subprocess
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, load_demo
from PIL import Image
from safetensors.torch import load_file, save_file

from simpletuner_longcat_video.testing.tiny import synthetic_clip, write_video

pytestmark = pytest.mark.slow
demo = load_demo()
CAPTURE = REPO / "tests" / "fault_injection"

# clip -> (suffix, Pillow format) of its start frame
FORMATS = {
    "clip_000": (".png", "PNG"),
    "clip_001": (".jpg", "JPEG"),
    "clip_002": (".webp", "WEBP"),
    "clip_003": (".bmp", "BMP"),
    "clip_004": (".JPG", "JPEG"),
}
ODD = "clip_005"  # 100x72 px, 12 frames at 12 fps: 64 px high on the 16 px grid (96x64), cut to 9 frames


def _deterministic_vae(checkpoint: Path) -> None:
    """Posterior std ~3e-7 (logvar -30), so the host's latent sample is the mean: comparable to ours."""
    path = checkpoint / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    half = weights["quant_conv.bias"].shape[0] // 2
    weights["quant_conv.weight"][half:] = 0
    weights["quant_conv.bias"][half:] = -30.0
    save_file(weights, str(path))


def _users_setup(workdir: Path) -> dict[str, Path]:
    """The demo's checkpoint and data, then the user's files: returns each clip's start-frame file."""
    demo.prepare(workdir)
    _deterministic_vae(workdir / "LongCat-Video-tiny")
    train = workdir / "datasets" / "longcat-video" / "train"
    for old in (train / "start_frames").iterdir():
        old.unlink()
    starts = {}
    for index, name in enumerate(FORMATS):
        path = train / "clips" / f"{name}.mp4"
        if not path.exists():  # the demo has four clips; the fifth is the user's
            write_video(path, synthetic_clip(index, frames=demo.TINY_FRAMES, height=64, width=64))
            (train / "clips" / f"{name}.txt").write_text("a square turns into its negative")
        suffix, kind = FORMATS[name]
        first = _first_frame(path)
        starts[name] = train / "start_frames" / f"{name}{suffix}"
        Image.fromarray(255 - first).save(starts[name], format=kind)  # the edit: the picture's negative
    write_video(train / "clips" / f"{ODD}.mp4", synthetic_clip(5, frames=12, height=72, width=100), fps=12)
    (train / "clips" / f"{ODD}.txt").write_text("a wide square drifts")
    starts[ODD] = train / "start_frames" / f"{ODD}.png"
    Image.fromarray(_first_frame(train / "clips" / f"{ODD}.mp4")).save(starts[ODD])

    shipped = json.loads((REPO / "examples" / "multidatabackend.json").read_text())
    datasets = json.loads((workdir / "config" / "multidatabackend.json").read_text())
    for dataset, original in zip(datasets, shipped, strict=True):
        for key in ("instance_data_dir", "cache_dir_vae", "cache_dir"):
            if key in original:
                dataset[key] = original[key]  # relative, as shipped
    train_clips = datasets[0]
    assert train_clips["id"] == "longcat-video-train"
    # The seed's form: is_i2v beside dataset_type (frame counts for a CPU, as the demo sets them).
    train_clips["video"].pop("is_i2v")
    train_clips["is_i2v"] = True
    (workdir / "config" / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))

    config = json.loads((workdir / "config" / "config.json").read_text())
    shipped_config = json.loads((REPO / "examples" / "config.json").read_text())
    config.update({key: shipped_config[key] for key in ("output_dir", "data_backend_config")})
    # fp32 VAE: the cached latents are then comparable to the test's own encoding to float precision.
    config.update(max_train_steps=6, checkpoint_step_interval=6, validation_steps=6, vae_dtype="fp32")
    (workdir / "config" / "config.json").write_text(json.dumps(config, indent=2))
    return starts


def _first_frame(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


@pytest.fixture(scope="module")
def users_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("users-data")
    starts = _users_setup(workdir)
    listing = sorted(p.name for p in (workdir / "datasets/longcat-video/train/start_frames").iterdir())
    captured = workdir / "captured"
    captured.mkdir()
    command, env = demo.host_command(workdir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CAPTURE), env.get("PYTHONPATH")]))
    env["LONGCAT_RECORD_DIR"] = str(captured)
    with (workdir / "train.log").open("w") as log:
        code = subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    text = re.sub(r"\x1b\[[0-9;]*m", "", (workdir / "train.log").read_text(errors="replace"))
    batches = [torch.load(path) for path in sorted(captured.glob("batch_*.pt"))]
    return workdir, code, text, starts, listing, batches


def test_shipped_relative_paths_and_the_seed_form_train_to_a_lora(users_run):
    workdir, code, log, _, _, batches = users_run
    assert code == 0, log[-3000:]
    lora = workdir / "output" / "longcat-video-i2v" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    assert any(tensor.abs().sum() > 0 for key, tensor in load_file(str(lora)).items() if "lora_B" in key)
    # The seed's is_i2v trained image-to-video: every batch carried its start frame.
    assert len(batches) == 6 and all(batch["num_cond_latents"] == 1 for batch in batches)
    assert "is_i2v beside dataset_type read as video.is_i2v = true" in log
    # Relative and absolute paths name cache files alike: each clip's latent lies directly in its
    # dataset's cache folder, named after the clip (not under a copy of the absolute data path).
    for split, names in (("train", [*FORMATS, ODD]), ("val", ["clip_100"])):
        for kind in ("clips", "start_frames"):
            folder = workdir / "cache" / "vae" / "longcat-video" / split / kind
            cached = sorted(p.relative_to(folder) for p in folder.rglob("*.pt"))
            expected = sorted(Path(sha256(name.encode()).hexdigest() + ".pt") for name in names)
            assert cached == expected, (folder, cached)


@functools.cache
def _vae(checkpoint: Path):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(str(checkpoint / "vae"))


def _encode_start_frame(workdir: Path, path: Path) -> torch.Tensor:
    """The start-frame file's latent as the pipeline encodes a start image: Pillow's pixels in [-1, 1],
    the VAE's mean, normalised."""
    from simpletuner_longcat_video.core.pipeline import normalize_latents

    vae = _vae(workdir / "LongCat-Video-tiny")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    video = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None, :, None]
    with torch.no_grad():
        latent = vae.encode(video).latent_dist.mode()
    return normalize_latents(latent, vae)[0, :, 0]


def test_start_frames_in_every_format_are_latent_frame_zero(users_run):
    workdir, code, _, starts, listing, batches = users_run
    assert code == 0
    seen = {}
    for batch in batches:
        (clip,) = batch["files"]
        seen[Path(clip).stem] = batch["frame0"][0, :, 0]
    assert set(FORMATS) <= set(seen), sorted(seen)
    for name in FORMATS:
        expected = _encode_start_frame(workdir, starts[name])
        own_first = _encode_start_frame_pixels(
            workdir, _first_frame(workdir / f"datasets/longcat-video/train/clips/{name}.mp4")
        )
        # The batch holds the latents in the LoRA's weight dtype (bf16 with adamw_bf16): equal to
        # the file's latent rounded to bf16, within two of its steps (2**-8 below 1; measured: 0 or 1).
        step = 2**-8 * max(1.0, expected.abs().max().item())
        error = (seen[name] - expected.to(torch.bfloat16).float()).abs().max().item()
        assert error <= 2 * step, (name, error)
        # Not the clip's own first frame: the edit-style start frame is what conditions the clip
        # (the tiny random VAE tells a picture from its negative by about 20 such steps).
        other = (seen[name] - own_first.to(torch.bfloat16).float()).abs().max().item()
        assert other > 10 * step, (name, other)
    # Nothing was written into the user's start-frame folder.
    assert sorted(p.name for p in (workdir / "datasets/longcat-video/train/start_frames").iterdir()) == listing


def _encode_start_frame_pixels(workdir: Path, pixels: np.ndarray) -> torch.Tensor:
    path = workdir / "first_frame.png"
    Image.fromarray(pixels).save(path)
    return _encode_start_frame(workdir, path)


def test_the_log_says_what_the_host_does_to_the_clips(users_run):
    workdir, code, log, _, _, _ = users_run
    assert code == 0
    (line,) = [line for line in log.splitlines() if "LongCat-Video dataset 'longcat-video-train'" in line]
    assert "6 clips" in line
    assert "64x64 -> 64x64 (5 clips)" in line
    assert "100x72 -> 96x64 (1 clip): squashed, aspect 1.39 -> 1.50 (crop is off" in line
    assert "Frames: the first 9 of 9 to 12 (video.num_frames" in line
    assert "clips at 8, 12 fps, framerate 8: frames are used as they are, not resampled" in line
    # What the line says is what was cached: the odd clip's latent is the 96x64 bucket, 9 frames.
    cache = workdir / "cache/vae/longcat-video/train/clips" / (sha256(ODD.encode()).hexdigest() + ".pt")
    entry = torch.load(io.BytesIO(gzip.decompress(cache.read_bytes())))  # the host gzips its cache files
    latents = entry["latents"] if isinstance(entry, dict) else entry
    assert tuple(latents.shape[-3:]) == ((9 - 1) // 4 + 1, 64 // 8, 96 // 8)
