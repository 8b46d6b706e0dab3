"""The quickstart's files (examples/, config/*.example) are valid: our rules and the host's own parser accept them."""

from __future__ import annotations

import json
from types import SimpleNamespace

from conftest import REPO, run_python

from simpletuner_longcat_video.host.datasets import check_training_config
from simpletuner_longcat_video.spec import check_frames

CONFIG = json.loads((REPO / "examples" / "config.json").read_text())
DATASETS = json.loads((REPO / "examples" / "multidatabackend.json").read_text())


def test_quickstart_values():
    expected = {
        "model_family": "longcat_video",
        "model_flavour": "final",
        "model_type": "lora",
        "train_batch_size": 1,
        "gradient_checkpointing": True,
        "lora_rank": 8,
        "learning_rate": 1e-4,
        "validation_num_video_frames": 93,
        "validation_num_inference_steps": 40,
        "validation_guidance": 4.0,
        "validation_using_datasets": True,
        "eval_dataset_id": "longcat-video-val",
        "aspect_bucket_alignment": 16,
    }
    assert {key: CONFIG[key] for key in expected} == expected
    check_training_config(SimpleNamespace(**CONFIG))


def test_quickstart_cp_targets_are_the_examples():
    for name in ("config.json", "multidatabackend.json"):
        assert (REPO / "config" / f"{name}.example").read_text() == (REPO / "examples" / name).read_text()


def test_datasets_pair_clips_with_start_frames():
    by_id = {dataset["id"]: dataset for dataset in DATASETS}
    train, cond = by_id["longcat-video-train"], by_id["longcat-video-cond"]
    assert train["video"]["is_i2v"] is True and train["conditioning_data"] == ["longcat-video-cond"]
    assert cond["dataset_type"] == "conditioning" and cond["caption_strategy"] is None
    assert by_id[CONFIG["eval_dataset_id"]]["conditioning_data"] == ["longcat-video-val-cond"]
    caches = [dataset.get("cache_dir_vae") for dataset in DATASETS if "cache_dir_vae" in dataset]
    assert len(caches) == len(set(caches)) == 4  # clips and start frames keep separate VAE caches
    for dataset in DATASETS:
        if "video" in dataset:
            assert check_frames(dataset["video"]["num_frames"], dataset["id"]) == 93


def test_host_parser_accepts_every_config_key():
    code = f"""
import json
from simpletuner.helpers.configuration.cmd_args import get_argument_parser
config = json.loads({json.dumps(json.dumps(CONFIG))})
args = [f"--{{key}}={{value}}" for key, value in config.items() if not isinstance(value, bool)]
args += [f"--{{key}}" for key, value in config.items() if value is True]
parsed, unknown = get_argument_parser().parse_known_args(args)
print("UNKNOWN", unknown)
from simpletuner_longcat_video.host.settings import apply_flow_shift_default
apply_flow_shift_default(parsed)
print("SHIFT", parsed.flow_schedule_shift, "ATTN", parsed.attention_implementation)
user, _ = get_argument_parser().parse_known_args(args + ["--flow_schedule_shift=3.0"])
apply_flow_shift_default(user)
print("USER SHIFT", user.flow_schedule_shift)
"""
    result = run_python(code)
    assert "UNKNOWN []" in result.stdout, result.stdout + result.stderr
    assert "SHIFT 12.0 ATTN auto" in result.stdout  # not in the config: the family's 12.0
    assert "USER SHIFT 3.0" in result.stdout  # the host's default value, but set by the user: kept
