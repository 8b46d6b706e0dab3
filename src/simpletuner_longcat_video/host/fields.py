"""The plugin's config keys as fields of the host's field registry: one source for its CLI and WebUI.

SimpleTuner 4.10.1 builds ``simpletuner train``'s argument parser
(``helpers/configuration/cmd_args.get_argument_parser``) and the WebUI's forms from one registry,
``simpletuner_sdk/server/services/field_registry/registry.field_registry``; its own families add
their keys with a ``register_fields(registry)`` function (``helpers/models/field_registry/wan.py``).
:func:`register_fields` does the same for ``spec.CONFIG_OPTIONS``, so the trainer accepts the keys
and the WebUI shows and saves them. ``_autoload`` calls it (through ``patches.extend_host_fields``)
right after the registry module has executed, before anything can build a parser or a form.

Each key keeps its name, type, default, choices and help text; the value rules stay in the family
(``settings.read_settings``), checked once at set-up, so no range is
written here a second time.
"""

from __future__ import annotations

from typing import Any

from simpletuner_longcat_video import spec

# spec.ConfigOption.tab -> the section of that tab the host's WebUI lays out for family-specific keys.
SECTIONS = {"model": "model_specific", "validation": "validation_options"}


def config_field(option: spec.ConfigOption, order: int = 0) -> Any:
    """The host's ``ConfigField`` for one plugin key, typed so that its parser gives what ours gave."""
    from simpletuner.simpletuner_sdk.server.services.field_registry.types import (
        ConfigField,
        FieldType,
        ImportanceLevel,
        ParserType,
    )

    if option.choices:
        # A select, not a checkbox, even for true/false: the host's checkbox parses to bool, and the
        # family has always received these keys as the strings argparse hands over.
        field_type, parser_type = FieldType.SELECT, None
        choices = [{"value": choice, "label": choice} for choice in option.choices]
    elif option.type is float:
        # Explicit: with an unset default the host would infer int for a number field.
        field_type, parser_type, choices = FieldType.NUMBER, ParserType.FLOAT, None
    elif option.type is int:
        # A number box in the WebUI, a string to the parser: the family's rule (e.g. 4k + 1 frames)
        # names a bad value instead of argparse's "invalid int value".
        field_type, parser_type, choices = FieldType.NUMBER, ParserType.STRING, None
    else:
        field_type, parser_type, choices = FieldType.TEXT, ParserType.STRING, None
    return ConfigField(
        name=option.name,
        arg_name=f"--{option.name}",
        ui_label=option.label,
        field_type=field_type,
        tab=option.tab,
        section=SECTIONS[option.tab],
        default_value=option.default,
        choices=choices,
        help_text=f"[plugin] {option.help}",
        importance=ImportanceLevel.IMPORTANT,
        model_specific=[spec.FAMILY],
        parser_type=parser_type,
        order=order,  # the WebUI lays a section out by order: the keys in spec's order
    )


def register_fields(registry: Any) -> list[str]:
    """Add every ``spec.CONFIG_OPTIONS`` key to the host's field registry; returns the names added.

    A key the registry already holds (a second call, or a host that adopted the key) is left alone.
    """
    added = []
    for order, option in enumerate(spec.CONFIG_OPTIONS, start=1):
        if registry.get_field(option.name) is None:
            registry._add_field(config_field(option, order))  # the host's own families register through it
            added.append(option.name)
    return added
