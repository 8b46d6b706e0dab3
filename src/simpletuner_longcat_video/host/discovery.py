"""Discovery: how an unmodified SimpleTuner finds plugin model families.

SimpleTuner 4.10.1 has no entry-point group for model families, so this package defines one,
``simpletuner.model_families``, and makes the host honour it: ``_autoload`` (run at interpreter
start through a ``.pth`` file) calls :func:`register_entry_points` right after the host's
``ModelRegistry`` module has executed, in every process of the environment (``simpletuner train``,
``simpletuner-train``, ``simpletuner server``, ``accelerate launch`` workers).

Families are registered lazily (the host's own ``LazyModelClass`` with metadata read from the
plugin's ``plugin_manifest.toml``), so listing families imports neither torch nor the family.
Plugin families win over the host's built-ins of the same name: ``ModelRegistry.register`` is
wrapped so that a built-in registering itself later (its module registers on import) is ignored.
Only the standard library is imported here.
"""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import Any

FAMILY_GROUP = "simpletuner.model_families"
ATTENTION_GROUP = "simpletuner.attention_backends"
MANIFEST_NAME = "plugin_manifest.toml"

logger = logging.getLogger("simpletuner_longcat_video.plugin")


def _ensure_log_handler() -> None:
    # The host configures its own loggers, not the root; without a handler our one line would be lost.
    parent = logging.getLogger("simpletuner_longcat_video")
    if not parent.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
        parent.addHandler(handler)
        parent.setLevel(os.environ.get("SIMPLETUNER_LOG_LEVEL", "INFO").upper())
        parent.propagate = False


@dataclass
class RegistrationState:
    """What this process registered, kept for the guard, the log and the tests."""

    owners: dict[str, str] = field(default_factory=dict)  # family -> "dist version (module:attr)"
    targets: dict[str, str] = field(default_factory=dict)  # family -> "module:attr"
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (family, ignored class path)
    errors: list[str] = field(default_factory=list)


STATE = RegistrationState()


def read_manifest(package: str) -> dict[str, Any] | None:
    """The ``plugin_manifest.toml`` shipped inside ``package``, or None if it ships none."""
    try:
        text = resources.files(package).joinpath(MANIFEST_NAME).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError, TypeError):
        return None
    return tomllib.loads(text)


def _class_path(obj: Any) -> str:
    real = getattr(obj, "_real_class", None) or obj
    meta = getattr(obj, "_metadata", None)
    if real is obj and isinstance(meta, dict) and "module_path" in meta:
        return f"{meta['module_path']}:{meta['class_name']}"
    return f"{getattr(real, '__module__', '?')}:{getattr(real, '__qualname__', repr(real))}"


class PluginLoadError(RuntimeError):
    """A plugin's family class could not be imported; names the plugin and the cause."""


def _make_proxy_class(lazy_base: type) -> type:
    """A subclass of the host's LazyModelClass that cannot take the host down.

    The host walks every registered family at start-up (its WebUI field registry reads class
    attributes of all of them), so a plugin whose module fails to import must not raise there:
    the failure is logged once, attribute look-ups then behave as "attribute absent", and only
    actually using the family raises :class:`PluginLoadError`.
    """

    class PluginFamily(lazy_base):
        def __init__(self, metadata: dict[str, Any], ep: metadata.EntryPoint, owner: str) -> None:
            super().__init__(metadata)
            self._entry_point = ep
            self._owner = owner
            self._load_error: PluginLoadError | None = None

        def get_real_class(self) -> type:
            if self._real_class is None:
                if self._load_error is None:
                    try:
                        self._real_class = self._entry_point.load()
                    except Exception as exc:
                        self._load_error = PluginLoadError(
                            f"plugin {self._owner} could not load model family {self._entry_point.name!r} "
                            f"from {self._entry_point.value} ({type(exc).__name__}: {exc}); reinstall the plugin "
                            f"or uninstall it to get the host's built-in family back"
                        )
                        self._load_error.__cause__ = exc
                        STATE.errors.append(str(self._load_error))
                        logger.error("%s", self._load_error)
                if self._load_error is not None:
                    raise self._load_error
            return self._real_class

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self.get_real_class()(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            if name.startswith("_"):
                raise AttributeError(name)
            try:
                real = self.get_real_class()
            except PluginLoadError as exc:
                raise AttributeError(f"{name} (unavailable: {exc})") from exc
            return getattr(real, name)

        def __repr__(self) -> str:
            return f"<plugin family {self._entry_point.name} = {self._entry_point.value} from {self._owner}>"

    return PluginFamily


def _family_metadata(ep: metadata.EntryPoint) -> dict[str, Any]:
    """Metadata for the host's LazyModelClass, from the owning package's manifest when it has one."""
    top_package = ep.module.split(".")[0]
    manifest = read_manifest(top_package) or {}
    for family in manifest.get("families", []):
        if family.get("name") == ep.name and family.get("class") == ep.value:
            return {
                "name": family["display_name"],
                "flavour_choices": list(family["flavours"]),
                "module_path": ep.module,
                "class_name": ep.attr,
                "prediction_type": family.get("prediction_type"),
            }
    # A plugin without a manifest entry: load the class now to read what the host needs.
    cls = ep.load()
    flavours = list(getattr(cls, "get_flavour_choices", lambda: [])())
    prediction = getattr(getattr(cls, "PREDICTION_TYPE", None), "value", None)
    return {
        "name": getattr(cls, "NAME", ep.name),
        "flavour_choices": flavours,
        "module_path": ep.module,
        "class_name": ep.attr,
        "prediction_type": prediction,
    }


def _check_host_version(dist: metadata.Distribution) -> str | None:
    """An error message if the installed host is outside the range this plugin declares."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging ships with the host; without it, skip rather than guess
        return None
    try:
        host_version = metadata.version("simpletuner")
    except metadata.PackageNotFoundError:
        return None
    for raw in dist.requires or []:
        req = Requirement(raw)
        if req.name.lower() == "simpletuner" and not req.specifier.contains(host_version, prereleases=True):
            return (
                f"plugin {dist.metadata['Name']} {dist.version} supports simpletuner{req.specifier}, "
                f"but simpletuner {host_version} is installed; install a supported host "
                f"(pip install 'simpletuner{req.specifier}') or a plugin release made for {host_version}"
            )
    return None


def _install_guards(registry: Any) -> None:
    """Wrap ``ModelRegistry.register`` and ``.get`` once per process.

    ``register``: plugin-owned families are immune to later built-in registrations (the host's
    built-in module registers itself whenever it is imported). ``get``: a plugin family is handed
    out as its real class once it imports, so callers that inspect classes (the WebUI's model
    details, ``issubclass`` checks) see ours rather than a proxy; listing stays lazy.
    """
    register_func = getattr(registry.__dict__.get("register"), "__func__", None)
    get_func = getattr(registry.__dict__.get("get"), "__func__", None)
    if register_func is None or get_func is None or getattr(register_func, "_plugin_guard", False):
        return

    def register(cls: Any, family: str, model_class: Any) -> None:
        key = family.lower()
        owner = STATE.targets.get(key)
        if owner is not None and _class_path(model_class) != owner:
            STATE.ignored.append((key, _class_path(model_class)))
            logger.debug(
                "ignored %s registering itself as %r: plugin %s owns that family",
                _class_path(model_class),
                key,
                STATE.owners[key],
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


def register_entry_points(registry_module: Any) -> RegistrationState:
    """Register every ``simpletuner.model_families`` entry point into the host's registry."""
    _ensure_log_handler()
    registry = registry_module.ModelRegistry
    proxy_class = _make_proxy_class(registry_module.LazyModelClass)
    registry._load_metadata()
    for ep in metadata.entry_points(group=FAMILY_GROUP):
        dist = ep.dist
        dist_label = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown distribution"
        try:
            if dist is not None:
                version_error = _check_host_version(dist)
                if version_error:
                    raise RuntimeError(version_error)
            family = ep.name.lower()
            meta = _family_metadata(ep)
            # Resolve the module's location now (without executing it) so a typo fails here, loudly.
            from importlib.util import find_spec

            if find_spec(ep.module) is None:
                raise ModuleNotFoundError(f"no module named {ep.module!r}")
            builtin = registry._metadata.get(family)
            replaced = registry._registry.get(family)
            STATE.owners[family] = f"{dist_label} ({ep.value})"
            STATE.targets[family] = ep.value
            registry._registry[family] = proxy_class(meta, ep, STATE.owners[family])
            if replaced is not None or builtin is not None:
                shadowed = (
                    _class_path(replaced)
                    if replaced is not None
                    else (f"{builtin['module_path']}:{builtin['class_name']}")
                )
                why = f"it replaces the built-in {shadowed}: installed plugin families take precedence over the host's"
            else:
                why = "no built-in family of that name exists"
            logger.info(
                "model family %r is provided by plugin %s via entry point group %s; %s",
                family,
                STATE.owners[family],
                FAMILY_GROUP,
                why,
            )
        except Exception as exc:
            message = (
                f"plugin {dist_label}: entry point '{ep.name} = {ep.value}' in group {FAMILY_GROUP} "
                f"failed and was skipped ({type(exc).__name__}: {exc}); the host continues without it"
            )
            STATE.errors.append(message)
            logger.error(message)
    _install_guards(registry)
    return STATE


def attention_backend_entry_points() -> list[metadata.EntryPoint]:
    """Entry points of the ``simpletuner.attention_backends`` group (loaded by the attention seam)."""
    return list(metadata.entry_points(group=ATTENTION_GROUP))


class HostDefault(float):
    """A host default value the user did not set; a family may replace it with its own default.

    Behaves exactly like the float it wraps, so every other family sees the host's value unchanged.
    """


def extend_host_fields(registry_module: Any) -> None:
    """Everything the plugin adds to the host's field registry (its CLI parser and WebUI forms)."""
    from simpletuner_longcat_video.fields import register_fields

    registry = registry_module.field_registry
    register_fields(registry)
    mark_flow_shift_as_host_default(registry)


def mark_flow_shift_as_host_default(registry: Any) -> None:
    """SimpleTuner 4.10.1: let a family tell "flow_schedule_shift not set" from "set to the host's 3.0".

    The host's ``flow_schedule_shift`` field has one default (3.0) for every family and the parsed
    config cannot say whether the user wrote it; LongCat-Video samples with 12.0 unless the user
    set a shift (``family.apply_flow_shift_default``). The field's default becomes a
    :class:`HostDefault` of the same value, which every other family, the parser and the WebUI
    read as that float.
    """
    field = registry.get_field("flow_schedule_shift")
    shift = getattr(field, "default_value", None)
    if isinstance(shift, (int, float)) and not isinstance(shift, (bool, HostDefault)):
        field.default_value = HostDefault(shift)


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


def extend_host_collate(collate: Any) -> None:
    """Everything the plugin changes in the host's batch collation module, once it has executed."""
    from simpletuner_longcat_video.faults import install_latent_check

    install_latent_check(collate)
    skip_pinning_without_accelerator(collate)


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


def _longcat_model() -> Any:
    """The host's current model when it is this plugin's LongCat-Video family, else None."""
    family = sys.modules.get("simpletuner_longcat_video.family")
    if family is None:  # never imported: the run is not ours
        return None
    from simpletuner.helpers.training.state_tracker import StateTracker

    model = StateTracker.get_model()
    return model if isinstance(model, family.LongCatVideo) else None


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
            return host_command(args)

        train.set_defaults(func=cmd_train)
        list_plugin_keys_in_train_help(train)

    _add_train_parser._plugin_wrapped = True  # type: ignore[attr-defined]
    cli._add_train_parser = _add_train_parser


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
