"""The main job on the embedded default (``make demo``): an image-to-video LoRA that learns, trained by the real host.

1. builds a tiny LongCat-Video checkpoint in the official layout (shaped so a LoRA can learn on
   it, see ``simpletuner_longcat_video.testing.tiny``) and a tiny edit-style paired dataset: two clips
   with one caption, each starting from a start frame of the other clip's colour, and a
   one-pair validation split;
2. takes ``examples/config.json`` and ``examples/multidatabackend.json`` (the quickstart's files)
   and changes only what a laptop CPU needs: the checkpoint path, the data folders, sizes, steps;
3. runs the host's own ``simpletuner train`` on them, with I2V validation from the eval split;
4. samples each training pair image-to-video with our pipeline, without and with the LoRA the
   run wrote, and compares with the clip (``simpletuner_longcat_video.testing.learning``): the demo
   passes only if the LoRA lowers the latent error by ``learning.THRESHOLD`` times or more.

Pointing ``pretrained_model_name_or_path`` at the real checkpoint (or leaving the hub id) and the
data folders at real clips is all a GPU user changes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent

# What the tiny CPU run changes in the quickstart's config (everything else is used as shipped).
CONFIG_OVERRIDES = {
    "max_train_steps": 6,
    "checkpoint_step_interval": 6,
    "validation_steps": 6,
    "validation_resolution": "64x64",
    "validation_num_video_frames": 9,
    "validation_num_inference_steps": 4,
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "learning_rate": 1e-3,
    "framerate": 8,
}
# The demo's own run (``prepare(..., learning=True)``): long enough for the LoRA to learn its two
# clips. Dropout is off (nothing to regularise on two clips, and it would only slow a CPU run down).
LEARNING_OVERRIDES = {
    **CONFIG_OVERRIDES,
    "max_train_steps": 120,
    "checkpoint_step_interval": 120,
    "validation_steps": 120,
    "learning_rate": 3e-3,
    "lora_dropout": 0.0,
    "caption_dropout_probability": 0.0,
}
DATASET_OVERRIDES = {"resolution": 64, "resolution_type": "pixel", "minimum_image_size": 32}
TINY_FRAMES = 9


def prepare(workdir: Path, *, learning: bool = False) -> Path:
    """Checkpoint, data and the two config files under ``workdir``; returns the config path.

    ``learning``: the demo's own run (the learning dataset, ``LEARNING_OVERRIDES``); without it a
    short run on four moving-square clips, the base the host-run tests break in their own ways.
    """
    from simpletuner_longcat_video.testing.tiny import build_learning_dataset, build_tiny_checkpoint, build_tiny_dataset

    checkpoint = build_tiny_checkpoint(workdir / "LongCat-Video-tiny")
    dataset = workdir / "datasets" / "longcat-video"
    if learning:
        folders = build_learning_dataset(dataset, frames=TINY_FRAMES)
    else:
        folders = build_tiny_dataset(dataset, frames=TINY_FRAMES)

    config = json.loads((EXAMPLES / "config.json").read_text())
    config.update(LEARNING_OVERRIDES if learning else CONFIG_OVERRIDES)
    config["pretrained_model_name_or_path"] = str(checkpoint)
    config["output_dir"] = str(workdir / "output")
    config["data_backend_config"] = str(workdir / "config" / "multidatabackend.json")

    datasets = json.loads((EXAMPLES / "multidatabackend.json").read_text())
    roles = {
        "longcat-video-train": "train_clips",
        "longcat-video-cond": "train_start_frames",
        "longcat-video-val": "val_clips",
        "longcat-video-val-cond": "val_start_frames",
    }
    for dataset in datasets:
        if dataset["id"] in roles:
            dataset["instance_data_dir"] = str(folders[roles[dataset["id"]]])
            dataset.update(DATASET_OVERRIDES)
            if "video" in dataset:
                dataset["video"].update(num_frames=TINY_FRAMES, min_frames=TINY_FRAMES)
        for key in ("cache_dir_vae", "cache_dir"):
            if key in dataset:
                dataset[key] = str(workdir / dataset[key])

    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    path = workdir / "config" / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def host_command(workdir: Path) -> tuple[list[str], dict[str, str]]:
    """The ``simpletuner train`` command line and environment for ``workdir`` (no hub)."""
    simpletuner = Path(sys.executable).parent / "simpletuner"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", HOME=str(workdir))
    env["PATH"] = f"{simpletuner.parent}{os.pathsep}{env.get('PATH', '')}"
    return [str(simpletuner), "train"], env


def train(workdir: Path, log_path: Path) -> int:
    """``simpletuner train`` in ``workdir`` (the host reads ``config/config.json`` there), no hub."""
    command, env = host_command(workdir)
    with log_path.open("w") as log:
        return subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def summarise(workdir: Path, log_text: str) -> dict:
    """What the run produced: LoRA file, validation videos (with frame counts), losses."""
    import av

    output = workdir / "output"
    lora = output / "pytorch_lora_weights.safetensors"
    videos = sorted((output / "validation_images").glob("*.mp4")) if (output / "validation_images").is_dir() else []
    frames = {}
    for video in videos:
        with av.open(str(video)) as container:
            frames[video.name] = sum(1 for _ in container.decode(video=0))
    # The progress bar repeats each step's line; keep the last loss reported for every step.
    per_step = {
        int(step): float(loss) for step, loss in re.findall(r"\| (\d+)/\d+ \[[^\]]*step_loss=([0-9.eE+-]+)", log_text)
    }
    losses = [per_step[step] for step in sorted(per_step)]
    return {"lora": lora if lora.is_file() else None, "videos": frames, "losses": losses}


def check_learning(workdir: Path, lora: Path):
    """The learning check (``simpletuner_longcat_video.testing.learning``) on the training pairs of ``workdir``."""
    from simpletuner_longcat_video.testing.learning import learning_check, training_pairs

    train = workdir / "datasets" / "longcat-video" / "train"
    pairs = training_pairs(train / "clips", train / "start_frames")
    return learning_check(workdir / "LongCat-Video-tiny", lora, pairs)


def _loss_trace(losses: list[float]) -> str:
    picked = {index: loss for index, loss in enumerate(losses, 1) if index == 1 or index % 25 == 0}
    return ", ".join(f"{step}: {loss:.3f}" for step, loss in picked.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path.cwd() / ".demo", help="where everything is written")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    start = time.monotonic()
    config = prepare(workdir, learning=True)
    prepared = time.monotonic()
    log_path = workdir / "train.log"
    code = train(workdir, log_path)
    trained = time.monotonic()
    result = summarise(workdir, log_path.read_text(errors="replace"))

    print(f"config:           {config} (examples/config.json with {sorted(LEARNING_OVERRIDES)} changed)")
    print(f"training log:     {log_path}")
    print(f"loss at steps:    {_loss_trace(result['losses'])}")
    print(f"LoRA weights:     {result['lora']}")
    for name, count in result["videos"].items():
        print(f"validation video: {workdir / 'output' / 'validation_images' / name} ({count} frames)")
    i2v_videos = [name for name in result["videos"] if "longcat-video-val" in name]
    ran = code == 0 and result["lora"] is not None and bool(i2v_videos) and bool(result["losses"])
    if not ran:
        print(f"demo FAILED (simpletuner train exit code {code}); see {log_path}", file=sys.stderr)
        return 1
    check = check_learning(workdir, result["lora"])
    checked = time.monotonic()
    print("learning check: each training pair sampled image-to-video from its start frame and caption;")
    print("latent MSE to the clip on the generated frames, without and with the LoRA:")
    print(check.table())
    print(
        f"time: prepare {prepared - start:.1f} s, simpletuner train {trained - prepared:.1f} s, "
        f"learning check {checked - trained:.1f} s"
    )
    if not check.passed:
        print(f"demo FAILED: the LoRA did not learn its clips ({check.improvement:.1f}x < {check.threshold:g}x)")
        return 1
    print("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
