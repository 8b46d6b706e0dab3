"""Continuation validation from the eval split: the eval clip's first K frames in, the clip beside the result out.

With ``validation_using_datasets`` SimpleTuner 4.10.1 hands the family one sample per eval clip
whose conditioning is the clip's first frame. For an eval dataset marked for continuation
(``longcat_condition_frames``) the family reads the whole clip instead, prepared by the host's
own training preparation for that dataset (``simpletuner.helpers.caching.vae.prepare_sample``:
bucket, crop, resize; then the first ``video.num_frames`` frames, as the host's VAE cache trims),
so validation continues from the frames whose latents training puts in the condition. After the
pipeline call the generated video and that clip are written side by side into one mp4, named for
what it holds and its size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from simpletuner_longcat_video import spec

logger = logging.getLogger("simpletuner_longcat_video.host.continuation")


@dataclass(frozen=True)
class EvalClip:
    """One eval clip to continue: its dataset, its file and its K. Its frames are read when it is
    validated (:meth:`frames_at`), so only one clip's frames are held at a time."""

    dataset_id: str
    path: str
    condition_frames: int

    def frames_at(self, width: int, height: int, model: Any) -> list[Image.Image]:
        """The clip as training prepares it (see the module doc), every frame resized to the generated size
        (LANCZOS, as a start image is resized for the pipeline)."""
        from simpletuner.helpers.caching.vae import prepare_sample
        from simpletuner.helpers.training.state_tracker import StateTracker

        video, _, _ = prepare_sample(image=None, data_backend_id=self.dataset_id, filepath=self.path, model=model)
        frames = as_frames(video)
        settings = StateTracker.get_data_backend_config(self.dataset_id) or {}
        kept = spec.whole_number((settings.get("video") or {}).get("num_frames"))
        return [
            frame if frame.size == (width, height) else frame.resize((width, height), Image.Resampling.LANCZOS)
            for frame in (frames[:kept] if kept else frames)
        ]


def as_frames(video: Any) -> list[Image.Image]:
    """A prepared video (``[T, H, W, 3]`` array or tensor, or a list of frames) as RGB PIL frames."""
    if isinstance(video, (list, tuple)):
        return [frame.convert("RGB") if isinstance(frame, Image.Image) else as_frames(frame)[0] for frame in video]
    if hasattr(video, "detach"):
        video = video.detach().cpu().numpy()
    array = np.asarray(video)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"a video must be [T, H, W, 3] frames, got shape {array.shape}")
    if array.shape[-1] != 3 and array.shape[1] == 3:  # [T, 3, H, W]
        array = array.transpose(0, 2, 3, 1)
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(array, 0.0, 1.0) * 255.0 if array.max() <= 1.0 else array
    return [Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8)).convert("RGB") for frame in array]


def side_by_side(left: list[Image.Image], right: list[Image.Image]) -> list[Image.Image]:
    """``left[t] | right[t]`` for every frame of ``left``; ``right`` ends in black frames when it is shorter."""
    width, height = left[0].size
    out = []
    for index, frame in enumerate(left):
        canvas = Image.new("RGB", (2 * width, height))
        canvas.paste(frame.convert("RGB"), (0, 0))
        if index < len(right):
            canvas.paste(right[index].convert("RGB"), (width, 0))
        out.append(canvas)
    return out


def side_by_side_name(step: int, shortname: str, width: int, height: int) -> str:
    """``step_<N>_<sample>_<W>x<H>.continued-beside-clip-<2W>x<H>.mp4``: generated size, then the file's."""
    return f"step_{step}_{shortname}_{width}x{height}.continued-beside-clip-{2 * width}x{height}.mp4"


def write_mp4(path: str, frames: list[Image.Image], fps: float) -> str:
    """``frames`` as an H.264 mp4 (PyAV, as the host's own validation videos); returns ``path``."""
    import av

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def save_beside_clip(
    folder: str,
    step: int,
    shortname: str,
    generated: list[Image.Image],
    truth: list[Image.Image],
    clip: EvalClip,
    fps: float,
) -> str:
    """The generated video and the eval clip's frames ``truth`` (at the generated size) side by side; the file written."""
    width, height = generated[0].size
    path = write_mp4(
        os.path.join(folder, side_by_side_name(step, shortname, width, height)), side_by_side(generated, truth), fps
    )
    if len(truth) < len(generated):
        logger.info(
            "LongCat-Video validation %s: the eval clip has %d frames, the continuation %d; the clip's side is black after "
            "its last frame",
            shortname,
            len(truth),
            len(generated),
        )
    logger.info(
        "LongCat-Video validation %s: continuation of %s from its first %d frames (left) beside the clip (right): %s",
        shortname,
        clip.path,
        clip.condition_frames,
        path,
    )
    return path
