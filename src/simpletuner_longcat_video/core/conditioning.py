"""Conditioned training batches: the condition frames are input, kept clean, at timestep 0, and never scored.

The host prepares a flow-matching batch for the whole clip (``latents``, ``noise``,
``noisy_latents``, one ``timesteps`` value per sample) and, for a dataset paired with start
frames, the start frames' cached latents as ``conditioning_latents``. These functions turn that
into the official training samples:

* image-to-video (:func:`apply_i2v_condition`): the first latent frame is replaced by the start
  frame's latent in both the clean and the noisy latents;
* video continuation (:func:`apply_continuation_condition`): the clip's own first
  ``num_cond_latents`` latent frames are the condition; the noisy latents get them back clean.

Either way the DiT sees per-frame timesteps with 0 for the condition frames, and the prediction
and the target both drop them (:func:`drop_condition_frames`), so they contribute nothing to the loss.
"""

from __future__ import annotations

import torch

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.errors import LongCatVideoError

SAME_BUCKET_FIX = (
    "give each start frame the size and aspect ratio of its clip (same bucket), then delete the "
    "start-frame VAE cache so it is rebuilt"
)


def _condition_tensor(batch: dict) -> torch.Tensor | None:
    cond = batch.get("conditioning_latents")
    if cond is None:
        return None
    if isinstance(cond, (list, tuple)):
        # The host hands a list (not a stacked tensor) only when the per-sample shapes differ.
        if not cond:
            return None
        shapes = {tuple(c.shape) for c in cond}
        if len(shapes) > 1:
            raise LongCatVideoError(
                where=f"start-frame latents for {_files(batch)}",
                value=sorted(shapes),
                rule="start frames in one batch must share their clips' bucket size",
                fix=SAME_BUCKET_FIX,
            )
        cond = torch.stack(list(cond))
    if cond.dim() == 4:  # [B, C, h, w]: an image latent without its frame axis
        cond = cond.unsqueeze(2)
    return cond


def _files(batch: dict) -> object:
    return batch.get("filepaths") or batch.get("image_paths") or "this batch"


def apply_i2v_condition(batch: dict) -> dict:
    """Put the start frame into the batch (see module doc); a batch without one is text-to-video."""
    latents = batch["latents"]
    cond = _condition_tensor(batch)
    batch["num_cond_latents"] = 0
    if cond is None:
        return batch
    count = spec.NUM_COND_LATENTS_I2V
    b, c, t, h, w = latents.shape
    if cond.shape[0] != b or cond.shape[1] != c or tuple(cond.shape[-2:]) != (h, w) or cond.shape[2] < count:
        raise LongCatVideoError(
            where=f"start-frame latents for {_files(batch)}",
            value=tuple(cond.shape),
            rule=f"must match the clip latents {tuple(latents.shape)} in batch, channels, height and width",
            fix=SAME_BUCKET_FIX,
        )
    if t <= count:
        raise LongCatVideoError(
            where="clip frames",
            value=t,
            rule="an image-to-video clip needs latent frames after the start frame (at least 5 video frames)",
            fix="use clips of 5 or more frames, e.g. num_frames 93",
        )
    cond = cond[:, :, :count].to(device=latents.device, dtype=latents.dtype)
    latents = latents.clone()
    latents[:, :, :count] = cond
    return _clean_leading_frames(batch, latents, count)


def apply_continuation_condition(batch: dict, num_cond_latents: int) -> dict:
    """A continuation batch: the clip's own first ``num_cond_latents`` latent frames are the condition.

    They are the clip's cached latents as they are (the Wan VAE is causal in time, so they encode
    the clip's first ``4 * (num_cond_latents - 1) + 1`` frames and nothing after), clean in the
    noisy latents, at timestep 0; the later frames keep the host's noise.
    """
    latents = batch["latents"]
    t = latents.shape[2]
    if batch.get("conditioning_latents") is not None:
        raise LongCatVideoError(
            where=f"continuation batch of {_files(batch)}",
            value="start-frame latents present",
            rule="a continuation batch conditions on the clip's own first frames, not on a start-frame dataset",
            fix=f"remove conditioning_data from the dataset or its {spec.CONDITION_FRAMES_KEY}",
        )
    if not 0 < num_cond_latents < t:
        raise LongCatVideoError(
            where=f"continuation batch of {_files(batch)}",
            value=f"{num_cond_latents} condition latent frames of {t}",
            rule="continuation needs latent frames after the condition frames",
            fix="use clips longer than the condition (num_frames above longcat_condition_frames)",
        )
    return _clean_leading_frames(batch, latents, num_cond_latents)


def _clean_leading_frames(batch: dict, latents: torch.Tensor, count: int) -> dict:
    """``latents``' first ``count`` frames, clean, into the noisy latents; per-frame timesteps with 0 there."""
    b, _, t = latents.shape[:3]
    noisy = batch["noisy_latents"].clone()
    noisy[:, :, :count] = latents[:, :, :count].to(noisy.dtype)
    per_frame = batch["timesteps"].reshape(b, -1)[:, :1].expand(b, t).clone()
    per_frame[:, :count] = 0
    batch.update(latents=latents, noisy_latents=noisy, frame_timesteps=per_frame, num_cond_latents=count)
    return batch


def drop_condition_frames(tensor: torch.Tensor, batch: dict) -> torch.Tensor:
    """The frames that are scored: all but the leading condition frames (I2V or continuation)."""
    count = int(batch.get("num_cond_latents", 0) or 0)
    if count and torch.is_tensor(tensor) and tensor.dim() == 5:
        return tensor[:, :, count:]
    return tensor
