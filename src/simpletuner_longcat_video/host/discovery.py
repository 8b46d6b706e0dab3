"""Discovery: how an unmodified SimpleTuner finds this plugin's model family.

SimpleTuner 4.10.1 has no entry-point group for model families, so this package declares one,
``simpletuner.model_families`` (``pyproject.toml``), and makes the host honour it for this
distribution: ``_autoload`` (run at interpreter start through a ``.pth`` file) calls
:func:`register_entry_points` right after the host's ``ModelRegistry`` module has executed, in every
process of the environment (``simpletuner train``, ``simpletuner-train``, ``simpletuner server``,
``accelerate launch`` workers).

Only this distribution's entry points are registered: another package's entry points are its own
business. The family is registered lazily (the host's own ``LazyModelClass``, with metadata from
``spec``), so listing families imports neither torch nor the family; an entry point whose module
is missing, or a host outside the declared range, is logged and skipped, and a family module that
fails to import raises :class:`PluginLoadError` only when the family is used. Precedence over the
host's built-in ``longcat_video`` is ``patches.keep_plugin_family_over_builtin``.
Only the standard library is imported here.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from importlib.util import find_spec
from typing import Any

from simpletuner_longcat_video import spec

FAMILY_GROUP = "simpletuner.model_families"
ATTENTION_GROUP = "simpletuner.attention_backends"

logger = logging.getLogger("simpletuner_longcat_video.host.discovery")


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
    """What this process registered, kept for the precedence patch, the log and the tests."""

    owners: dict[str, str] = field(default_factory=dict)  # family -> "dist version (module:attr)"
    targets: dict[str, str] = field(default_factory=dict)  # family -> "module:attr"
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (family, ignored class path)
    errors: list[str] = field(default_factory=list)


STATE = RegistrationState()


def class_path(obj: Any) -> str:
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
    """Metadata for the host's LazyModelClass, from ``spec`` (the family's one source of facts)."""
    return {
        "name": spec.DISPLAY_NAME,
        "flavour_choices": list(spec.FLAVOURS),
        "module_path": ep.module,
        "class_name": ep.attr,
        "prediction_type": spec.PREDICTION_TYPE,
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


def register_entry_points(registry_module: Any) -> RegistrationState:
    """Register this distribution's ``simpletuner.model_families`` entry points into the host's registry."""
    _ensure_log_handler()
    registry = registry_module.ModelRegistry
    proxy_class = _make_proxy_class(registry_module.LazyModelClass)
    registry._load_metadata()
    for ep in metadata.entry_points(group=FAMILY_GROUP):
        dist = ep.dist
        if dist is None or dist.name != spec.DISTRIBUTION:
            continue
        dist_label = f"{dist.metadata['Name']} {dist.version}"
        try:
            version_error = _check_host_version(dist)
            if version_error:
                raise RuntimeError(version_error)
            family = ep.name.lower()
            meta = _family_metadata(ep)
            # Resolve the module's location now (without executing it) so a typo fails here, loudly.
            if find_spec(ep.module) is None:
                raise ModuleNotFoundError(f"no module named {ep.module!r}")
            builtin = registry._metadata.get(family)
            replaced = registry._registry.get(family)
            STATE.owners[family] = f"{dist_label} ({ep.value})"
            STATE.targets[family] = ep.value
            registry._registry[family] = proxy_class(meta, ep, STATE.owners[family])
            if replaced is not None or builtin is not None:
                shadowed = (
                    class_path(replaced)
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
    return STATE
