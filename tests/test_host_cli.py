"""The real host, started as users start it: its WebUI server and its `simpletuner train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import host_environ

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.testing.hostserver import host_server

pytestmark = pytest.mark.slow


def test_server_api_lists_and_describes_our_family(tmp_path):
    with host_server(tmp_path) as server:
        families = server.get_json("/api/models")["families"]
        details = server.get_json("/api/models/longcat_video")
        flavours = server.get_json("/api/models/longcat_video/flavours")
        log = server.log()
    assert "longcat_video" in families and "wan" in families
    assert details["class"] == "simpletuner_longcat_video.host.family.LongCatVideo"
    assert details["display_name"] == "LongCat-Video"
    encoder = details["attributes"]["text_encoder_configuration"]["text_encoder"]
    assert "UMT5EncoderModel" in json.dumps(encoder)
    assert "Qwen" not in json.dumps(details)
    assert details["capabilities"]["is_video_model"] is True
    # The host's model API has no field for continuation; the description the WebUI shows names it.
    assert details["attributes"]["model_description"] == spec.DESCRIPTION and "video continuation" in spec.DESCRIPTION
    assert flavours["flavours"] == ["final"]
    assert log.count("is provided by plugin simpletuner-longcat-video") >= 1


def _simpletuner(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "simpletuner")
    env = host_environ(HOME=str(cwd))
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_help_lists_the_plugin_keys(tmp_path):
    # Not the checkout: the host writes a debug.log into its working directory.
    result = _simpletuner("train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: simpletuner train" in result.stdout
    # Flag, choices and default of each key (that the trainer accepts them: the host runs below).
    listed = result.stdout.split("config keys of the LongCat-Video plugin", 1)[1]
    for option in spec.CONFIG_OPTIONS:
        choices = " {" + ",".join(option.choices) + "}" if option.choices else ""
        assert f"  --{option.name}{choices}  (default: {option.default})\n" in listed, option.name


def _write_config(root: Path, **overrides: object) -> None:
    config = {
        "model_family": "longcat_video",
        "model_flavour": "final",
        "model_type": "lora",
        "pretrained_model_name_or_path": str(root / "no-such-checkpoint"),
        "output_dir": str(root / "output"),
        "data_backend_config": str(root / "config" / "multidatabackend.json"),
        "train_batch_size": 1,
        "max_train_steps": 1,
        "num_train_epochs": 0,
        "optimizer": "adamw_bf16",
        "learning_rate": 1e-4,
        "lora_rank": 8,
        "mixed_precision": "no",
        "report_to": "none",
    }
    config.update(overrides)
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "config.json").write_text(json.dumps(config, indent=2))
    (root / "config" / "multidatabackend.json").write_text("[]")


def test_train_config_reaches_our_family(tmp_path):
    # Through the seed's `--config` with an absolute path, run from a folder with no config/ of its
    # own and with a CONFIG_PATH left in the shell that points elsewhere: the file named on the
    # command line is the one the training worker reads (the other tests here use plain
    # `simpletuner train`, which reads config/config.json). The chosen config passes every rule
    # checked before launch (empty official folders), so it is the worker that stops, at the load.
    chosen_root, decoy = tmp_path / "configs", tmp_path / "decoy"
    chosen_root.mkdir()
    decoy.mkdir()
    checkpoint = _fake_layout(chosen_root)
    (checkpoint / "text_encoder" / "config.json").write_text(
        '{"model_type": "umt5", "architectures": ["UMT5EncoderModel"]}'
    )
    _write_config(chosen_root, pretrained_model_name_or_path=str(checkpoint))
    _write_config(decoy, pretrained_model_name_or_path=str(tmp_path / "decoy-checkpoint"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    exe = str(Path(sys.executable).parent / "simpletuner")
    env = host_environ(HOME=str(workdir), CONFIG_PATH=str(decoy / "config" / "config.json"))
    result = subprocess.run(
        [exe, "train", "--config", str(chosen_root / "config" / "config.json")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert "is provided by plugin simpletuner-longcat-video" in output
    assert "error: argument" not in output and "unrecognized arguments" not in output
    assert "Running: accelerate launch" in output and "refused before launch" not in output
    # The worker read the chosen file: it stops loading from the chosen (empty) checkpoint.
    assert f"no file named scheduler_config.json found in directory {checkpoint}" in output, output[-3000:]
    assert "decoy-checkpoint" not in output
    assert result.returncode != 0


def test_train_refuses_a_bad_config_before_launch(tmp_path):
    # The same rule, in the `simpletuner train` process: nothing launches, the message names the file.
    _write_config(tmp_path, pretrained_model_name_or_path=str(tmp_path / "no-such-checkpoint"))
    result = _simpletuner("train", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"{tmp_path / 'config' / 'config.json'} refused before launch: " in output
    assert f"pretrained_model_name_or_path = '{tmp_path / 'no-such-checkpoint'}'" in output, output[-3000:]
    assert "a local LongCat-Video checkpoint folder must exist" in output
    assert "Running: accelerate launch" not in output


def _fake_layout(root: Path) -> Path:
    # Empty official folders: the tests using them stop at a config rule or at the missing-folder
    # check, both before anything in the folders (the text encoder's config.json first) is read.
    checkpoint = root / "ckpt"
    for name in ("dit", "vae", "text_encoder", "tokenizer", "scheduler"):
        (checkpoint / name).mkdir(parents=True)
    return checkpoint


def test_train_accepts_plugin_keys_and_names_a_bad_chunk(tmp_path):
    checkpoint = _fake_layout(tmp_path)
    _write_config(
        tmp_path,
        pretrained_model_name_or_path=str(checkpoint),
        attention_implementation="sdpa",
        longcat_bsa_sparsity=0.75,
    )
    # The bad value comes as an override after `train`: checked with the file's keys, before launch.
    result = _simpletuner("train", "longcat_bsa_chunk=3,3,3", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "unrecognized arguments" not in output
    assert "longcat_bsa_chunk = '3,3,3'" in output
    assert "power of two in [16, 256]" in output
    assert result.returncode != 0 and "Running: accelerate launch" not in output


def test_train_missing_dit_folder_is_named(tmp_path):
    checkpoint = _fake_layout(tmp_path)
    (checkpoint / "dit").rmdir()
    _write_config(tmp_path, pretrained_model_name_or_path=str(checkpoint))
    result = _simpletuner("train", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "missing: ['dit']" in output
    assert result.returncode != 0


def test_train_unknown_flavour_names_the_valid_ones(tmp_path):
    _write_config(tmp_path, model_flavour="turbo")
    result = _simpletuner("train", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "model_flavour = 'turbo'" in output
    assert "has the flavours ['final']" in output
    assert "Running: accelerate launch" not in output
    assert os.path.exists(tmp_path / "config" / "config.json")


def test_train_block_sparse_without_cuda_is_refused_before_anything_loads(tmp_path):
    checkpoint = _fake_layout(tmp_path)  # empty folders: reaching any load would fail otherwise
    _write_config(tmp_path, pretrained_model_name_or_path=str(checkpoint), attention_implementation="block_sparse")
    result = _simpletuner("train", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "attention_implementation = 'block_sparse': the block-sparse kernels are Triton kernels for CUDA GPUs" in output
    )
    assert "this machine has none (no CUDA device" in output
    assert "Loading AutoencoderKLWan" not in output and "text_encoder/config.json" not in output
    assert not list(tmp_path.rglob("*.pt"))  # no cache of any kind


def test_train_config_option_refuses_a_missing_or_wrong_file_by_name(tmp_path):
    # Stopped in the CLI itself, before any training process starts.
    missing = _simpletuner("train", "--config", "config/config.json", cwd=tmp_path)
    assert missing.returncode == 2
    assert "simpletuner train --config = 'config/config.json': there is no file " in missing.stderr
    assert f"{tmp_path / 'config' / 'config.json'}. Fix: create it" in missing.stderr
    _write_config(tmp_path)
    (tmp_path / "config" / "config.toml").write_text("")
    wrong = _simpletuner("train", "--config", str(tmp_path / "config" / "config.toml"), cwd=tmp_path)
    assert wrong.returncode == 2 and "--config takes a SimpleTuner JSON config file" in wrong.stderr
    both = _simpletuner("train", "--config", "config/config.json", "--env", "other", cwd=tmp_path)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    for result in (missing, wrong, both):
        assert "Running: accelerate launch" not in result.stdout
