"""Test-only fault injection for host training runs; never on a user's path.

tests/test_faults.py puts this folder on PYTHONPATH, so Python imports this file at start-up in
every process of the run (the ``simpletuner`` CLI, ``accelerate launch``, the training worker).
Everything around the injected call is the real code: host loop, family, attention seam, saves.

``LONGCAT_FAULT_BSA_FAIL_AT=N``: once ``simpletuner_longcat_video.attention_bsa`` has been imported
its availability probe says yes (this machine has no CUDA for the Triton kernel) and the kernel
call it makes is replaced: launches 1..N-1 return dense attention, as a working kernel at
sparsity 0 would, and launch N raises the error a GPU driver gives for a bad launch.

``LONGCAT_FAULT_PAUSE=<folder>:<when>,...`` with ``LONGCAT_FAULT_PAUSE_DIR``: the family's LoRA
save into ``<folder>`` (a ``checkpoint-N`` folder, or ``output`` for the final LoRA) stops and
waits there, so that a test can interrupt the run at exactly that moment. ``<when>`` is
``before`` (nothing of the LoRA written yet), or ``half`` (the first half of the file's bytes
written, as a save cut off mid-write leaves it). The worker first writes its pid into
``$LONGCAT_FAULT_PAUSE_DIR/<folder>`` so the test knows it is there.
"""

import os
import sys
import time
from pathlib import Path

BSA_TARGET = "simpletuner_longcat_video.attention_bsa"
FAMILY_TARGET = "simpletuner_longcat_video.family"
FAIL_AT = int(os.environ.get("LONGCAT_FAULT_BSA_FAIL_AT", "0") or 0)
PAUSES = dict(item.split(":", 1) for item in os.environ.get("LONGCAT_FAULT_PAUSE", "").split(",") if ":" in item)
PAUSE_DIR = os.environ.get("LONGCAT_FAULT_PAUSE_DIR", "")


def _inject_bsa(module) -> None:
    import torch.nn.functional as F

    launches = [0]

    def available():
        return module.Availability(True, "fault injection: kernel assumed compiled")

    def kernel(q, k, v, **_options):
        launches[0] += 1
        if launches[0] >= FAIL_AT:
            sys.stderr.write(f"[fault-injection] block-sparse launch #{launches[0]} fails\n")
            raise RuntimeError("CUDA error: unspecified launch failure (injected)")
        return F.scaled_dot_product_attention(q, k, v)

    module.is_available = available
    module.block_sparse_attention = kernel


def _pause(folder: str) -> None:
    (Path(PAUSE_DIR) / folder).write_text(str(os.getpid()))
    sys.stderr.write(f"[fault-injection] LoRA save into {folder} paused\n")
    time.sleep(600)  # the test interrupts the run long before this ends


def _inject_pauses(module) -> None:
    family = module.LongCatVideo
    save = family.save_lora_weights

    def paused_save(self, *args, **kwargs):
        directory = Path(args[0] if args else kwargs["save_directory"])
        folder = "output" if directory.name == "output" else directory.name
        when = PAUSES.get(folder)
        if when == "before":
            _pause(folder)
        result = save(self, *args, **kwargs)
        if when == "half":
            written = directory / "pytorch_lora_weights.safetensors"
            data = written.read_bytes()
            written.write_bytes(data[: len(data) // 2])
            _pause(folder)
        return result

    family.save_lora_weights = paused_save


class _Watcher:
    """Runs ``targets[name](module)`` right after the module ``name`` has executed."""

    def __init__(self, targets) -> None:
        self.targets = dict(targets)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.targets:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_inject(module):
            exec_module(module)
            # Only now: the plugin's importlib.util.find_spec probe asks for a spec it never executes.
            self.targets.pop(fullname)(module)
            if not self.targets and self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_and_inject
        return spec


_TARGETS = {}
if FAIL_AT > 0:
    _TARGETS[BSA_TARGET] = _inject_bsa
if PAUSES and PAUSE_DIR:
    _TARGETS[FAMILY_TARGET] = _inject_pauses
if _TARGETS:
    sys.meta_path.insert(0, _Watcher(_TARGETS))
