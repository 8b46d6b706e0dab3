"""The family's config rules for attention, checked directly (the host CLI tests go end to end)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host import patches
from simpletuner_longcat_video.host.settings import attention_options_from_config


def config(**values):
    return SimpleNamespace(**{option.name: option.default for option in spec.CONFIG_OPTIONS} | values)


def test_defaults_are_upstream_block_sparse_settings():
    options = attention_options_from_config(config())
    assert (options.backend, options.sparsity, options.chunk, options.cdf_threshold) == ("auto", 0.875, (4, 4, 8), None)


def test_keys_reach_the_options(monkeypatch):
    from simpletuner_longcat_video.core import attention_bsa

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
        ("longcat_bsa_chunk", "3,3,3", "power of two in [16, 256]"),
        ("longcat_bsa_chunk", "0,4,8", "every entry must be a positive int"),
        ("longcat_bsa_chunk", "a,b,c", "three positive integers"),
        ("longcat_bsa_sparsity", 1.5, "in [0, 1]"),
        ("longcat_bsa_sparsity", -0.1, "in [0, 1]"),
        ("longcat_bsa_sparsity", "lots", "in [0, 1]"),
        ("longcat_bsa_cdf_threshold", 0.0, "in (0, 1]"),
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
    assert args.longcat_compile_blocks == "auto" and type(args.flow_schedule_shift) is patches.HostDefault
    numbers, _ = parser.parse_known_args([*required, "--longcat_bsa_cdf_threshold=0.9", "--longcat_bsa_sparsity=0.5"])
    assert (numbers.longcat_bsa_cdf_threshold, numbers.longcat_bsa_sparsity) == (0.9, 0.5)
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser.parse_args([*required, "--attention_implementation=flash"])
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser.parse_args([*required, "--longcat_compile_blocks=yes"])
    preview, unknown = parser.parse_known_args(
        [*required, "--longcat_validation_distill_lora=/ckpt/lora/x.safetensors"]
    )
    assert unknown == [] and preview.longcat_validation_distill_lora == "/ckpt/lora/x.safetensors"
    assert args.longcat_validation_distill_lora is None


def test_plugin_keys_are_fields_of_the_host_registry():
    # The one source of the host's parser and its WebUI forms; shown for this family only.
    from simpletuner.simpletuner_sdk.server.services.field_registry import field_registry

    from simpletuner_longcat_video.host.fields import register_fields

    for option in spec.CONFIG_OPTIONS:
        field = field_registry.get_field(option.name)
        assert field.default_value == option.default and field.help_text == f"[plugin] {option.help}"
        assert [choice["value"] for choice in field.choices or []] == list(option.choices or [])

    def shown(family: str, tab: str) -> set[str]:
        return {field.name for field in field_registry.get_fields_for_tab(tab, {"model_family": family})}

    names = {option.name for option in spec.CONFIG_OPTIONS}
    assert shown("longcat_video", "validation") & names == {"longcat_validation_distill_lora"}
    assert shown("longcat_video", "model") & names == names - {"longcat_validation_distill_lora"}
    assert not names & (shown("wan", "model") | shown("wan", "validation"))
    assert register_fields(field_registry) == []  # a second call adds nothing
