"""Test-only fault injection and batch capture for host training runs; never on a user's path.

Tests put this folder on PYTHONPATH, so Python imports this file at start-up in every process of
the run (the ``simpletuner`` CLI, ``accelerate launch``, the training worker). Each part is off
unless its environment variable is set:

* ``LONGCAT_FAULT_BSA_FAIL_AT=N`` (tests/test_faults.py): once
  ``simpletuner_longcat_video.attention_bsa`` has been imported its availability probes say yes
  (this machine has no CUDA for the Triton kernel) and the kernel call it makes is replaced:
  launches 1..N-1 return dense attention, as a working kernel at sparsity 0 would, and launch N
  raises the error a GPU driver gives for a bad launch.
* ``LONGCAT_CAPTURE_BATCHES=<folder>`` (tests/test_user_data.py): every training batch, right
  after the family has put the start frame into it (``prepare_batch_conditions``), is saved as
  ``<folder>/batch_<n>.pt``: its files, latent frame 0 and the number of condition frames.

Everything around these points is the real code: host loop, family, attention seam, adapter.
"""

import os
import sys

FAIL_AT = int(os.environ.get("LONGCAT_FAULT_BSA_FAIL_AT", "0") or 0)
CAPTURE = os.environ.get("LONGCAT_CAPTURE_BATCHES", "")


def _inject_bsa_failure(module) -> None:
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
    module.prerequisites = available  # the config-time check for CUDA and Triton
    module.block_sparse_attention = kernel


def _capture_batches(module) -> None:
    import torch

    original = module.LongCatVideo.prepare_batch_conditions
    count = [0]

    def prepare_batch_conditions(self, batch, state):
        batch = original(self, batch, state)
        count[0] += 1
        record = {
            "filepaths": [str(path) for path in batch.get("filepaths") or []],
            "frame0": batch["latents"][:, :, 0].detach().float().cpu(),
            "num_cond_latents": int(batch.get("num_cond_latents", 0) or 0),
        }
        torch.save(record, os.path.join(CAPTURE, f"batch_{count[0]:03d}.pt"))
        return batch

    module.LongCatVideo.prepare_batch_conditions = prepare_batch_conditions


TARGETS = {}
if FAIL_AT > 0:
    TARGETS["simpletuner_longcat_video.attention_bsa"] = _inject_bsa_failure
if CAPTURE:
    TARGETS["simpletuner_longcat_video.family"] = _capture_batches


class _Watcher:
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS:
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

        # A spec can be asked for and never used (the plugin resolves entry-point modules with
        # importlib.util.find_spec), so the target is done only once its module has executed.
        def exec_and_inject(module):
            exec_module(module)
            TARGETS.pop(fullname)(module)
            if not TARGETS and self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_and_inject
        return spec


if TARGETS:
    sys.meta_path.insert(0, _Watcher())
