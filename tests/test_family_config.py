"""The family's config rules for attention, checked directly (the host CLI tests go end to end)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from simpletuner_longcat_video import plugin, spec
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.family import attention_options_from_config


def config(**values):
    return SimpleNamespace(**{option.name: option.default for option in spec.CONFIG_OPTIONS} | values)


def test_defaults_are_upstream_block_sparse_settings():
    options = attention_options_from_config(config())
    assert (options.backend, options.sparsity, options.chunk, options.cdf_threshold) == ("auto", 0.875, (4, 4, 8), None)


def test_keys_reach_the_options(monkeypatch):
    from simpletuner_longcat_video import attention_bsa

    # As on a machine with CUDA and Triton (block_sparse is refused without them: test_bad_inputs).
    monkeypatch.setattr(attention_bsa, "prerequisites", lambda: attention_bsa.Availability(True, "test"))
    options = attention_options_from_config(
        config(
            attention_implementation="block_sparse",
            longcat_bsa_sparsity=0.75,
            longcat_bsa_chunk="2,4,8",
            longcat_bsa_cdf_threshold=0.9,
        )
    )
    assert (options.backend, options.sparsity, options.chunk, options.cdf_threshold) == (
        "block_sparse",
        0.75,
        (2, 4, 8),
        0.9,
    )


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("attention_implementation", "flash", "must be one of"),
        ("longcat_bsa_chunk", "4,4", "three positive integers"),
        ("longcat_bsa_chunk", "3,3,3", "power of two from 16 to 256"),
        ("longcat_bsa_chunk", "a,b,c", "three positive integers"),
        ("longcat_bsa_sparsity", 1.0, "must lie in [0, 1)"),
        ("longcat_bsa_cdf_threshold", 0.0, "must lie in (0, 1]"),
    ],
)
def test_bad_values_are_named(key, value, rule):
    with pytest.raises(LongCatVideoError) as info:
        attention_options_from_config(config(**{key: value}))
    assert info.value.where == key and rule in info.value.rule and info.value.fix


def test_xformers_forced_without_xformers_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    with pytest.raises(LongCatVideoError, match="xFormers is not installed"):
        attention_options_from_config(config(attention_implementation="xformers"))


def test_host_parser_carries_plugin_keys():
    from simpletuner.helpers.configuration import cmd_args

    parser = cmd_args.get_argument_parser()
    required = [
        "--model_family=longcat_video",
        "--output_dir=out",
        "--model_type=lora",
        "--optimizer=adamw_bf16",
        "--data_backend_config=backends.json",
    ]
    args, unknown = parser.parse_known_args(
        [*required, "--attention_implementation=xformers", "--longcat_bsa_chunk=4,4,8"]
    )
    assert unknown == [] and args.attention_implementation == "xformers" and args.longcat_bsa_chunk == "4,4,8"
    assert args.longcat_bsa_sparsity == 0.875 and args.longcat_bsa_cdf_threshold is None
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser.parse_args([*required, "--attention_implementation=flash"])
    before = len(parser._actions)
    plugin.add_plugin_arguments(parser)  # idempotent
    assert len(parser._actions) == before
