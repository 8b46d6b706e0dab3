"""Test-only mutations of the image-to-video training batch, to show that the learning check catches them.

Each mutation replaces one name in ``simpletuner_longcat_video.host.family`` (the module whose
``LongCatVideo`` the host calls every step) with a wrapped, broken version of the product's own
function, so the host's ``prepare_batch`` / ``model_predict`` / ``loss`` path runs unchanged around
it. ``tests/test_learning.py`` applies them in process. Applied inside a real ``simpletuner
train`` instead (``apply(name, module)`` once the family module has executed, from a
sitecustomize on ``PYTHONPATH``), two of them gave the same verdict: docs/faults.md.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

Setter = Callable[[object, str, object], None]


def _flow_sign(family: ModuleType, setattr_: Setter) -> None:
    # model_predict without its negation: the DiT is trained towards latents - noise in the host's
    # convention, the opposite of the velocity the sampler steps along.
    original = family.LongCatVideo.model_predict

    def model_predict(self, prepared_batch):
        out = original(self, prepared_batch)
        return {**out, "model_prediction": -out["model_prediction"]}

    setattr_(family.LongCatVideo, "model_predict", model_predict)


def _wrap_condition(family: ModuleType, setattr_: Setter, after: Callable[[dict, dict], None]) -> None:
    original = family.apply_i2v_condition

    def apply_i2v_condition(batch):
        host = {"noisy_latents": batch["noisy_latents"].clone(), "timesteps": batch["timesteps"].clone()}
        batch = original(batch)
        if batch.get("num_cond_latents"):
            after(batch, host)
        return batch

    setattr_(family, "apply_i2v_condition", apply_i2v_condition)


def _noised_condition_frame(family: ModuleType, setattr_: Setter) -> None:
    # Latent frame 0 keeps the host's noisy latent (the clip's own first frame, noised) instead of
    # the clean start-frame latent: the start frame never reaches the DiT.
    def after(batch, host):
        count = batch["num_cond_latents"]
        batch["noisy_latents"][:, :, :count] = host["noisy_latents"][:, :, :count]

    _wrap_condition(family, setattr_, after)


def _condition_timestep(family: ModuleType, setattr_: Setter) -> None:
    # The condition frame gets the noisy frames' timestep instead of 0.
    def after(batch, host):
        count = batch["num_cond_latents"]
        batch["frame_timesteps"][:, :count] = batch["frame_timesteps"][:, count : count + 1]

    _wrap_condition(family, setattr_, after)


def _reversed_timesteps(family: ModuleType, setattr_: Setter) -> None:
    # Timesteps counted from the data end (1000 - t): 1000 for the clean condition frame, small
    # values for the noisiest latents.
    def after(batch, host):
        batch["frame_timesteps"] = 1000.0 - batch["frame_timesteps"]

    _wrap_condition(family, setattr_, after)


def _noised_continuation_frames(family: ModuleType, setattr_: Setter) -> None:
    # A continuation batch keeps the host's noise on the clip's first latent frames: the condition
    # the DiT sees is noised, as the later frames are.
    original = family.apply_continuation_condition

    def apply_continuation_condition(batch, num_cond_latents):
        noisy = batch["noisy_latents"].clone()
        batch = original(batch, num_cond_latents)
        batch["noisy_latents"][:, :, :num_cond_latents] = noisy[:, :, :num_cond_latents]
        return batch

    setattr_(family, "apply_continuation_condition", apply_continuation_condition)


def _condition_frame_in_loss(family: ModuleType, setattr_: Setter) -> None:
    # Prediction and target keep latent frame 0: the loss also scores the start frame.
    setattr_(family, "drop_condition_frames", lambda tensor, batch: tensor)


MUTATIONS: dict[str, Callable[[ModuleType, Setter], None]] = {
    "flow_sign": _flow_sign,
    "noised_condition_frame": _noised_condition_frame,
    "condition_timestep": _condition_timestep,
    "reversed_timesteps": _reversed_timesteps,
    "condition_frame_in_loss": _condition_frame_in_loss,
    "noised_continuation_frames": _noised_continuation_frames,
}


def apply(name: str, family: ModuleType, setattr_: Setter = setattr) -> None:
    """Break ``family`` (the imported ``simpletuner_longcat_video.host.family``) with mutation ``name``."""
    MUTATIONS[name](family, setattr_)
