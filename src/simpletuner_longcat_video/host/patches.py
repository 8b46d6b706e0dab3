"""Every run-time change of SimpleTuner, one function each: what it changes, why, the host version.

SimpleTuner 4.10.1 offers no hook for any of these. ``_autoload.HOOKS`` names, for each host
module, the function here that is called once that module has executed; that table is the one
place the patches are applied from, and ``docs/plugin.md`` lists each with its reason. Functions
that take a host module leave it alone when called twice. Where a patch changes behaviour, it does
so only for this plugin's family; every other family gets the host's function unchanged.

Supported mechanisms are not patches: the config keys go through the host's field registry
(``fields.register_fields``), the family through its model registry (``discovery``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from simpletuner_longcat_video.host import discovery

logger = logging.getLogger("simpletuner_longcat_video.host.patches")


# simpletuner.helpers.models.registry


def register_family(registry_module: Any) -> None:
    """The family's entry point into the host's model registry, then the precedence patch."""
    discovery.register_entry_points(registry_module)
    keep_plugin_family_over_builtin(registry_module.ModelRegistry)


def keep_plugin_family_over_builtin(registry: Any) -> None:
    """SimpleTuner 4.10.1: ``ModelRegistry.register``/``get`` wrapped so the plugin's family stays the one used.

    ``register``: the host's built-in ``longcat_video`` module registers itself whenever it is
    imported, which would replace ours at a moment nobody controls; a family the plugin owns
    ignores later registrations. ``get``: the family is handed out as its real class once it
    imports, so callers that inspect classes (the WebUI's model details, ``issubclass`` checks) see
    ours rather than the lazy proxy; listing stays lazy.
    """
    register_func = getattr(registry.__dict__.get("register"), "__func__", None)
    get_func = getattr(registry.__dict__.get("get"), "__func__", None)
    if register_func is None or get_func is None or getattr(register_func, "_plugin_guard", False):
        return
    state = discovery.STATE

    def register(cls: Any, family: str, model_class: Any) -> None:
        key = family.lower()
        owner = state.targets.get(key)
        if owner is not None and discovery.class_path(model_class) != owner:
            state.ignored.append((key, discovery.class_path(model_class)))
            logger.debug(
                "ignored %s registering itself as %r: plugin %s owns that family",
                discovery.class_path(model_class),
                key,
                state.owners[key],
            )
            return
        register_func(cls, family, model_class)

    def get(cls: Any, family: str) -> Any:
        found = get_func(cls, family)
        resolve = getattr(found, "_entry_point", None) is not None and hasattr(found, "get_real_class")
        if resolve:
            try:
                real = found.get_real_class()
            except Exception:  # already logged by the proxy; using the family raises the named error
                return found
            cls._registry[family.lower()] = real
            return real
        return found

    register._plugin_guard = True  # type: ignore[attr-defined]
    registry.register = classmethod(register)
    registry.get = classmethod(get)


# simpletuner.simpletuner_sdk.server.services.field_registry.registry


class HostDefault(float):
    """A host default value the user did not set; a family may replace it with its own default.

    Behaves exactly like the float it wraps, so every other family sees the host's value unchanged.
    """


def extend_host_fields(registry_module: Any) -> None:
    """The plugin's keys through the supported mechanism (``fields.register_fields``), then one patch."""
    from simpletuner_longcat_video.host.fields import register_fields

    registry = registry_module.field_registry
    register_fields(registry)
    mark_flow_shift_as_host_default(registry)


def mark_flow_shift_as_host_default(registry: Any) -> None:
    """SimpleTuner 4.10.1: let a family tell "flow_schedule_shift not set" from "set to the host's 3.0".

    The host's ``flow_schedule_shift`` field has one default (3.0) for every family and the parsed
    config cannot say whether the user wrote it; LongCat-Video samples with 12.0 unless the user
    set a shift (``settings.apply_flow_shift_default``). The field's default becomes a
    :class:`HostDefault` of the same value, which every other family, the parser and the WebUI
    read as that float.
    """
    field = registry.get_field("flow_schedule_shift")
    shift = getattr(field, "default_value", None)
    if isinstance(shift, (int, float)) and not isinstance(shift, (bool, HostDefault)):
        field.default_value = HostDefault(shift)


# simpletuner.helpers.data_backend.factory


def extend_host_data_config(factory: Any) -> None:
    """Let a family read the data backend config before SimpleTuner 4.10.1 configures any dataset.

    The host reads ``multidatabackend.json`` in ``FactoryRegistry.load_configuration`` and then
    configures the datasets one by one, each scanned and VAE-encoded before the next is read; no
    family hook runs in between, so a rule broken by the third dataset's files was found only after
    the first two were encoded. The wrapped method hands the loaded list to the model's
    ``prepare_data_backend_config(datasets)`` when the family defines one; other families get the
    host's list unchanged.
    """
    registry = factory.FactoryRegistry
    original = registry.load_configuration
    if getattr(original, "_plugin_wrapped", False):
        return

    def load_configuration(self: Any) -> Any:
        datasets = original(self)
        prepare = getattr(getattr(self, "model", None), "prepare_data_backend_config", None)
        return datasets if prepare is None else prepare(datasets)

    load_configuration._plugin_wrapped = True  # type: ignore[attr-defined]
    registry.load_configuration = load_configuration


# simpletuner.helpers.training.collate


def extend_host_collate(collate: Any) -> None:
    """Everything the plugin changes in the host's batch collation module, once it has executed."""
    check_cached_latents(collate)
    skip_pinning_without_accelerator(collate)


def check_cached_latents(collate: Any) -> None:
    """SimpleTuner 4.10.1: ``collate.compute_latents`` routed through ``faults.checked_latents`` for this family.

    ``compute_latents`` is the one function every cached latent of a batch passes through (clips
    and start frames, cached or on demand, with or without an accelerator); the host trains on a
    truncated or non-finite cache file, or fails deep inside the step without naming it. For the
    LongCat-Video family each latent is checked and a bad one is refused by file name.
    """
    original = collate.compute_latents
    if getattr(original, "_plugin_wrapped", False):
        return

    def compute_latents(filepaths, data_backend_id, model):
        if not is_longcat(model):
            return original(filepaths, data_backend_id, model)
        from simpletuner_longcat_video.host.faults import checked_latents

        return checked_latents(original, filepaths, data_backend_id, model)

    compute_latents._plugin_wrapped = True  # type: ignore[attr-defined]
    collate.compute_latents = compute_latents


def skip_pinning_without_accelerator(collate: Any) -> None:
    """Let the host's collation run on a machine without a GPU.

    SimpleTuner 4.10.1's ``collate.fetch_latent`` calls ``Tensor.pin_memory()`` on every cached
    latent unless MPS is present; with no accelerator torch raises "Found no NVIDIA driver", so
    CPU-only training (our CI and ``make demo``) cannot fetch a single batch. Pinned memory only
    speeds up host-to-device copies, so without a device the same lookup without pinning is
    exactly equivalent. With an accelerator the host's function is left untouched.
    """
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return
    from simpletuner.helpers.training.state_tracker import StateTracker

    def fetch_latent(fp: str, data_backend_id: str) -> Any:
        return StateTracker.get_vaecache(id=data_backend_id).retrieve_from_cache(fp)

    collate.fetch_latent = fetch_latent
    logger.info("no accelerator: SimpleTuner's latent fetch runs without pinning memory (a no-op on CPU)")


def is_longcat(model: Any) -> bool:
    """Whether ``model`` is this plugin's family (without importing it: an unimported family is not in use)."""
    family = sys.modules.get("simpletuner_longcat_video.host.family")
    return family is not None and isinstance(model, family.LongCatVideo)


def _longcat_model() -> Any:
    """The host's current model when it is this plugin's LongCat-Video family, else None."""
    if sys.modules.get("simpletuner_longcat_video.host.family") is None:  # never imported: the run is not ours
        return None
    from simpletuner.helpers.training.state_tracker import StateTracker

    model = StateTracker.get_model()
    return model if is_longcat(model) else None


# simpletuner.helpers.training.validation


def extend_host_validation(validation: Any) -> None:
    """Everything the plugin changes in the host's validation module, once it has executed."""
    pair_validation_start_frames(validation)
    stitch_start_image_beside_each_frame(validation.Validation)
    name_validation_videos_by_content(validation.validation_video)


def pair_validation_start_frames(validation: Any) -> None:
    """SimpleTuner 4.10.1: I2V validation from the eval split starts from the eval clip's own first frame.

    With ``validation_using_datasets``, ``retrieve_validation_images`` takes its I2V samples from the
    eval clips and uses frame 0 of each clip as the start image, while training puts the latent of
    the clip's paired start-frame file (its conditioning dataset) in latent frame 0; with edit-style
    pairs the two differ and validation silently shows another task. The function is wrapped: for
    the LongCat-Video family the host's samples go through ``family.LongCatVideo.pair_validation_start_frames``
    (the paired start frame, prepared as training prepares it); other families get the host's result.
    """
    original = validation.retrieve_validation_images
    if getattr(original, "_plugin_wrapped", False):
        return

    def retrieve_validation_images() -> Any:
        samples = original()
        model = _longcat_model()
        return samples if model is None else model.pair_validation_start_frames(samples)

    retrieve_validation_images._plugin_wrapped = True  # type: ignore[attr-defined]
    validation.retrieve_validation_images = retrieve_validation_images


def stitch_start_image_beside_each_frame(validation_class: Any) -> None:
    """SimpleTuner 4.10.1 loses every validation video when ``disable_benchmark`` is true.

    Without a base-model benchmark its ``validate_prompt`` stitches the start image to the left of
    each result with ``stitch_validation_input_image``, which takes one image; a video result is a
    list of frames, so it raises (``'list' object has no attribute 'size'``), the host logs the
    error and saves nothing. For the LongCat-Video family the start image is stitched beside each
    frame instead; other families and single images are unchanged.
    """
    original = validation_class.stitch_validation_input_image
    if getattr(original, "_plugin_wrapped", False):
        return

    def stitch_validation_input_image(self, validation_image_result, validation_input_image, *args, **kwargs):
        if isinstance(validation_image_result, list) and _longcat_model() is not None:
            return [original(self, frame, validation_input_image, *args, **kwargs) for frame in validation_image_result]
        return original(self, validation_image_result, validation_input_image, *args, **kwargs)

    stitch_validation_input_image._plugin_wrapped = True  # type: ignore[attr-defined]
    stitch_validation_input_image._plugin_original = original  # type: ignore[attr-defined]
    validation_class.stitch_validation_input_image = stitch_validation_input_image


def name_validation_videos_by_content(validation_video: Any) -> None:
    """SimpleTuner 4.10.1 names a validation video after ``validation_resolution`` but fills it with a collage.

    ``save_videos`` writes ``step_<N>_<sample>_<i>_<W>x<H>.mp4`` from the stitched preview: start image,
    base model and this step side by side, the prompt in a footer below (202x107 pixels for a 64x64
    video), which its encoder then stretches to the 16-pixel grid (208x112). For the LongCat-Video
    family the frames are padded to that grid instead (nothing is stretched) and the name says what
    the file holds: ``..._<i>_64x64-stitched-208x112.mp4`` (the generated size, then the file's). A
    file that holds just the generated video keeps the host's name. Other families are unchanged.
    """
    original = validation_video.save_videos
    if getattr(original, "_plugin_wrapped", False):
        return

    def save_videos(save_dir, validation_images, validation_shortname, validation_resolutions, config, *args, **kwargs):
        model = _longcat_model()
        videos = validation_images.get(validation_shortname, [])
        if model is None or not videos:
            return original(
                save_dir, validation_images, validation_shortname, validation_resolutions, config, *args, **kwargs
            )
        generated = getattr(model, "validation_video_sizes", {}).get(validation_shortname.split("__")[0])
        labels, padded = [], []
        for index, frames in enumerate(videos):
            label = _host_resolution_label(validation_resolutions, index, frames)
            frames, label = _stitched_file_label(frames, label, generated)
            labels.append(label)
            padded.append(frames)
        images = {**validation_images, validation_shortname: padded}
        return original(save_dir, images, validation_shortname, labels, config, *args, **kwargs)

    save_videos._plugin_wrapped = True  # type: ignore[attr-defined]
    validation_video.save_videos = save_videos


def _host_resolution_label(resolutions: Any, index: int, frames: Any) -> str:
    """The ``<W>x<H>`` label SimpleTuner 4.10.1's ``save_videos`` gives video ``index``."""
    if index < len(resolutions):
        value = resolutions[index]
        if isinstance(value, tuple):
            return f"{value[0]}x{value[1]}"
        return value if isinstance(value, str) and "x" in value else f"{value}x{value}"
    first = frames[0] if isinstance(frames, list) and frames else frames
    width, height = getattr(first, "size", (0, 0))
    return f"{width}x{height}"


def _stitched_file_label(frames: Any, label: str, generated: tuple[int, int] | None) -> tuple[Any, str]:
    """The frames to write and their file label: a collage is padded to the encoder's 16-pixel grid."""
    from PIL import Image

    if not (isinstance(frames, list) and frames and all(isinstance(frame, Image.Image) for frame in frames)):
        return frames, label
    size = f"{generated[0]}x{generated[1]}" if generated else label
    width, height = frames[0].size
    if f"{width}x{height}" == size:
        return frames, size
    grid = (-(-width // 16) * 16, -(-height // 16) * 16)
    padded = []
    for frame in frames:
        canvas = Image.new("RGB", grid)
        canvas.paste(frame.convert("RGB"), (0, 0))
        padded.append(canvas)
    return padded, f"{size}-stitched-{grid[0]}x{grid[1]}"


# simpletuner.cli


def add_train_config_option(cli: Any) -> None:
    """``simpletuner train --config PATH.json`` (the seed's command), mapped onto the host's ``--env``.

    Patch of SimpleTuner 4.10.1's ``simpletuner.cli._add_train_parser``: its ``train`` command has
    no ``--config`` (argparse stops with "unrecognized arguments: --config"), but it reads a JSON
    config named by ``--env <file>.json`` and by ``CONFIG_PATH``. ``--config`` joins ``--env`` and
    ``--example`` in their mutually exclusive group, is checked here (a clear error naming the
    file), and is then handed to the host as exactly those two.
    """
    original = getattr(cli, "_add_train_parser", None)
    if original is None or getattr(original, "_plugin_wrapped", False):
        return

    def _add_train_parser(subparsers: Any) -> None:
        original(subparsers)
        train = subparsers.choices.get("train")
        if train is None or "--config" in train._option_string_actions:
            return
        exclusive = [g for g in train._mutually_exclusive_groups if "--env" in _option_strings(g._group_actions)]
        (exclusive[0] if exclusive else train).add_argument(
            "--config",
            metavar="PATH.json",
            help="[plugin] run training with this JSON config file (relative to the working directory or absolute)",
        )
        host_command = train.get_default("func")

        def cmd_train(args: Any) -> int:
            if getattr(args, "config", None):
                from simpletuner_longcat_video.errors import LongCatVideoError

                try:
                    args.env = config_file_as_env(args.config, os.environ)
                except LongCatVideoError as error:
                    train.error(str(error))
            refused = refuse_bad_config_before_launch(args)
            if refused is not None:
                return refused
            return host_command(args)

        train.set_defaults(func=cmd_train)
        list_plugin_keys_in_train_help(train)

    _add_train_parser._plugin_wrapped = True  # type: ignore[attr-defined]
    cli._add_train_parser = _add_train_parser


def refuse_bad_config_before_launch(args: Any) -> int | None:
    """Check a LongCat-Video config in the ``simpletuner train`` process itself; 1 if refused, else None.

    Part of :func:`add_train_config_option`'s ``train`` command (SimpleTuner 4.10.1 checks a family's
    config only inside the trainer that ``accelerate launch`` starts, 30-60 s after the command). The
    JSON config the host would read (``--config``, ``--env``, or ``config/config.json`` found in the
    working directory) plus the ``key=value`` overrides after ``train`` go through the host's own
    parser (its defaults included), then through ``settings.check_config_before_launch``. A refusal
    prints the error and stops before anything launches; anything this check cannot read (another
    config backend, a config the host's parser rejects) is left to the host as before.
    """
    import json

    from simpletuner_longcat_video import spec
    from simpletuner_longcat_video.errors import LongCatVideoError

    path = _json_config_the_host_reads(args)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return None  # the host names an unreadable config itself
    if not isinstance(raw, dict):
        return None
    values = {key if key.startswith("--") else f"--{key}": value for key, value in raw.items()}
    for arg in getattr(args, "args", None) or []:
        key, _, value = arg.partition("=")
        values[key if key.startswith("--") else f"--{key}"] = value if _ else "true"
    if values.get("--model_family") != spec.FAMILY:
        return None
    try:
        from simpletuner.helpers.configuration.loader import load_config

        config = load_config(values, exit_on_error=False)
    except (Exception, SystemExit):
        return None
    if config is None:
        return None
    from simpletuner_longcat_video.host.settings import check_config_before_launch

    try:
        check_config_before_launch(config)
    except LongCatVideoError as error:
        print(f"LongCat-Video: {path} refused before launch: {error}", file=sys.stderr, flush=True)
        return 1
    except Exception:  # a rule that needs what only the trainer has: the trainer checks it
        logger.debug("pre-launch check skipped", exc_info=True)
    return None


def _json_config_the_host_reads(args: Any) -> str | None:
    """The JSON file ``simpletuner train`` will hand its trainer (the host's own lookup order), or None."""
    if getattr(args, "example", None):
        return None
    env = getattr(args, "env", None)
    if env:
        candidates = [env] if env.lower().endswith(".json") else [os.path.join("config", env, "config.json")]
    else:
        candidates = ["config.json", os.path.join("config", "config.json")]
        if any(os.path.exists(name) for name in ("config.toml", "config.env")) and not os.path.exists("config.json"):
            return None
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def list_plugin_keys_in_train_help(train: Any) -> None:
    """``simpletuner train --help`` ends with the plugin's config keys (``spec.CONFIG_OPTIONS``).

    SimpleTuner 4.10.1's ``train --help`` names only ``--example``/``--env`` (the config keys live in
    the trainer's own parser), so nothing tells a user which keys the plugin adds. Called with the
    ``train`` parser by :func:`add_train_config_option`'s wrapper. The list is written from the
    entries ``fields.register_fields`` registers, not read back from the host's field registry:
    importing the registry makes ``--help`` take about 24 s instead of 5 s (measured here).
    """
    host_format_help = train.format_help

    def format_help() -> str:
        return host_format_help() + plugin_keys_help()

    train.format_help = format_help


def plugin_keys_help() -> str:
    """The plugin's keys for a help text: flag, choices, default, meaning."""
    import textwrap

    from simpletuner_longcat_video.spec import CONFIG_OPTIONS

    lines = ["", "config keys of the LongCat-Video plugin (in config.json, or --key=value after train):"]
    for option in CONFIG_OPTIONS:
        choices = " {" + ",".join(option.choices) + "}" if option.choices else ""
        lines.append(f"  --{option.name}{choices}  (default: {option.default})")
        lines.extend(textwrap.wrap(option.help, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines) + "\n"


def _option_strings(actions: Any) -> set[str]:
    return {option for action in actions for option in action.option_strings}


def config_file_as_env(raw: str, environ: Any) -> str:
    """The host's environment for ``--config raw``: the absolute file path, also set as CONFIG_PATH.

    ``--env`` alone is not enough: the host's JSON loader tries ``CONFIG_PATH`` first, so a value
    left in the user's shell would win over the file named on the command line.
    """
    from simpletuner_longcat_video.errors import LongCatVideoError

    path = os.path.abspath(os.path.expanduser(raw))
    if not path.lower().endswith(".json"):
        raise LongCatVideoError(
            where="simpletuner train --config",
            value=raw,
            rule="--config takes a SimpleTuner JSON config file (a name ending in .json)",
            fix="give the path of your config.json (for a folder of config files use --env FOLDER)",
        )
    if not os.path.isfile(path):
        raise LongCatVideoError(
            where="simpletuner train --config",
            value=raw,
            rule=f"there is no file {path}",
            fix="create it (cp config/config.json.example config/config.json in a checkout of the plugin), "
            "or give the path of an existing config, relative to the working directory or absolute",
        )
    environ["CONFIG_BACKEND"] = "json"
    environ["CONFIG_PATH"] = path
    return path
