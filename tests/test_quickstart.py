"""docs/quickstart.md, executed the way a new user follows it.

A user's folder gets the checkout's ``config/`` and ``examples/`` as shipped, and a small dataset of
the user's own in the layout of section 4 (their own clip names, captions written as edit
instructions). Then every shell command of the quickstart's code blocks runs verbatim, in order,
in that folder: a docs change that breaks a command breaks this test. Between copying the
example files and training, the user fills in the config by editing JSON values, as section 3
says; the only values changed are the checkpoint (the tiny one in place of the hub id) and what a
CPU needs (sizes, steps), listed in ``USER_EDITS`` / ``DATASET_EDITS``. Paths stay relative, as
shipped.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, host_environ
from PIL import Image
from safetensors.torch import load_file
from test_docs import QUICKSTART, code_blocks

from simpletuner_longcat_video.testing.tiny import write_video

pytestmark = pytest.mark.slow

# Commands the test cannot run here, and why (everything else in the quickstart runs verbatim).
NOT_RUN = {
    ("pip", "install"): "the test runs in the project environment, which already holds the installed package",
    ("make", "demo"): "a command of the checkout (it builds the environment and runs examples/demo.py); "
    "CI runs it as the main job, and it would not touch the user's folder",
    ("simpletuner", "server"): "starts the WebUI server, which runs until it is stopped; "
    "tests/test_host_cli.py and tests/test_webui.py drive it",
}
# Section 3: "Fill in pretrained_model_name_or_path ...". The tiny checkpoint replaces the hub id;
# the rest shrinks the run for 2 CPU cores (the shipped values take a GPU and hours).
USER_EDITS = {
    "max_train_steps": 2,
    "checkpoint_step_interval": 2,
    "validation_steps": 2,
    "validation_resolution": "64x64",
    "validation_num_video_frames": 9,
    "validation_num_inference_steps": 2,
    "mixed_precision": "no",
}
# multidatabackend.json: clips of 64x64 pixels and 9 frames instead of 480p and 93.
DATASET_EDITS = {"resolution": 64, "resolution_type": "pixel", "minimum_image_size": 32}
FRAMES = 9
CLIPS = {  # the user's own clips: name -> (caption, an edit instruction; colour of the moving square)
    "train": {
        "walk_01": ("make the square red", (220, 40, 40)),
        "walk_02": ("turn the square green", (40, 200, 60)),
        "spin_03": ("paint the square blue", (50, 70, 230)),
    },
    "val": {"walk_04": ("make the square yellow", (230, 220, 40))},
}


def quickstart_commands() -> list[tuple[str, list[str]]]:
    """Every shell command of docs/quickstart.md's bash blocks (line as written, words), in order."""
    return [
        (line, argv)
        for block in code_blocks(QUICKSTART)
        if block.lang == "bash"
        for line in block.body.splitlines()
        if (argv := shlex.split(line, comments=True))
    ]


def _clip(colour: tuple[int, int, int], shift: int) -> np.ndarray:
    frames = np.zeros((FRAMES, 64, 64, 3), dtype=np.uint8)
    frames[...] = np.linspace(20, 90, 64, dtype=np.uint8)[None, None, :, None]
    for t in range(FRAMES):
        x = (shift + 4 * t) % 48
        frames[t, 20:36, x : x + 16] = colour
    return frames


def make_users_dataset(root: Path) -> None:
    """Section 4's layout: clips + captions, start frames under the same names, a validation split."""
    for split, clips in CLIPS.items():
        clip_dir = root / "datasets" / "longcat-video" / split / "clips"
        start_dir = root / "datasets" / "longcat-video" / split / "start_frames"
        clip_dir.mkdir(parents=True)
        start_dir.mkdir(parents=True)
        for index, (name, (caption, colour)) in enumerate(clips.items()):
            frames = _clip(colour, 7 * index)
            write_video(clip_dir / f"{name}.mp4", frames, fps=16)  # the shipped config's framerate
            (clip_dir / f"{name}.txt").write_text(caption)
            Image.fromarray(frames[0]).save(start_dir / f"{name}.png")


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def fill_in_config(root: Path, checkpoint: Path) -> None:
    def config(values: dict) -> None:
        assert values["pretrained_model_name_or_path"] == "meituan-longcat/LongCat-Video"
        values["pretrained_model_name_or_path"] = str(checkpoint)
        values.update(USER_EDITS)

    def datasets(entries: list) -> None:
        for entry in entries:
            if "instance_data_dir" in entry:
                entry.update(DATASET_EDITS)
            if "video" in entry:
                entry["video"].update(num_frames=FRAMES, min_frames=FRAMES)

    edit_json(root / "config" / "config.json", config)
    edit_json(root / "config" / "multidatabackend.json", datasets)


def test_the_quickstart_runs_as_written(tiny_checkpoint, tmp_path):
    user = tmp_path / "checkout"
    user.mkdir()
    # "From a checkout of this repository": the two folders the commands use, exactly as shipped
    # (config/*.example are links into examples/).
    shutil.copytree(REPO / "config", user / "config", symlinks=True)
    shutil.copytree(REPO / "examples", user / "examples", symlinks=True)
    make_users_dataset(user)
    environ = host_environ(HOME=str(user))

    commands = quickstart_commands()
    ran, filled_in = [], False
    for line, argv in commands:
        if tuple(argv[:2]) in NOT_RUN:
            continue
        if argv[:2] == ["simpletuner", "train"] and not filled_in:
            fill_in_config(user, tiny_checkpoint)
            filled_in = True
        log = tmp_path / f"command-{len(ran)}.log"
        with log.open("w") as out:
            code = subprocess.run(
                ["bash", "-c", line], cwd=user, env=environ, stdout=out, stderr=subprocess.STDOUT, timeout=900
            ).returncode
        assert code == 0, f"`{line}` exited with {code}:\n{log.read_text(errors='replace')[-4000:]}"
        ran.append(argv)
    assert [argv[0] for argv in ran].count("cp") == 2 and filled_in, ran
    assert sum(argv[:2] == ["simpletuner", "train"] for argv in ran) >= 1
    assert {tuple(argv[:2]) for _, argv in commands} >= set(NOT_RUN), "a skipped command left the quickstart"

    # What section 5 promises: the LoRA in output_dir, I2V validation videos from the eval split.
    output = user / json.loads((user / "config" / "config.json").read_text())["output_dir"]
    lora = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert lora and all(bool(tensor.float().isfinite().all()) for tensor in lora.values())
    videos = sorted((output / "validation_images").glob("*.mp4"))
    assert any("longcat-video-val" in video.name for video in videos), videos
