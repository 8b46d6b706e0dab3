"""The main job on the embedded default (``make demo``): a real image-to-video LoRA training run.

1. builds a tiny random LongCat-Video checkpoint in the official layout and a tiny paired dataset
   (short synthetic clips with captions, their start frames under the same file names, and a
   one-clip validation split);
2. takes ``examples/config.json`` and ``examples/multidatabackend.json`` (the quickstart's files)
   and changes only what a laptop CPU needs: the checkpoint path, the data folders, sizes, steps;
3. runs the host's own ``simpletuner train`` on them, with I2V validation from the eval split;
4. prints where the LoRA weights and the validation video are, and checks them.

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
DATASET_OVERRIDES = {"resolution": 64, "resolution_type": "pixel", "minimum_image_size": 32}
TINY_FRAMES = 9


def prepare(workdir: Path) -> Path:
    """Checkpoint, data and the two config files under ``workdir``; returns the config path."""
    from simpletuner_longcat_video.tiny import build_tiny_checkpoint, build_tiny_dataset

    checkpoint = build_tiny_checkpoint(workdir / "LongCat-Video-tiny")
    folders = build_tiny_dataset(workdir / "datasets" / "longcat-video", frames=TINY_FRAMES)

    config = json.loads((EXAMPLES / "config.json").read_text())
    config.update(CONFIG_OVERRIDES)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path.cwd() / ".demo", help="where everything is written")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    start = time.monotonic()
    config = prepare(workdir)
    prepared = time.monotonic()
    log_path = workdir / "train.log"
    code = train(workdir, log_path)
    trained = time.monotonic()
    result = summarise(workdir, log_path.read_text(errors="replace"))

    print(f"config:           {config} (examples/config.json with {sorted(CONFIG_OVERRIDES)} changed)")
    print(f"training log:     {log_path}")
    print(f"losses per step:  {result['losses']}")
    print(f"LoRA weights:     {result['lora']}")
    for name, count in result["videos"].items():
        print(f"validation video: {workdir / 'output' / 'validation_images' / name} ({count} frames)")
    print(f"time: prepare {prepared - start:.1f} s, simpletuner train {trained - prepared:.1f} s")
    i2v_videos = [name for name in result["videos"] if "longcat-video-val" in name]
    ok = code == 0 and result["lora"] is not None and bool(i2v_videos) and bool(result["losses"])
    if not ok:
        print(f"demo FAILED (simpletuner train exit code {code}); see {log_path}", file=sys.stderr)
        return 1
    print("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
