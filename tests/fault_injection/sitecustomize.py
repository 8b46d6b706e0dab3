"""Test-only fault injection for host training runs; never on a user's path.

tests/test_faults.py puts this folder on PYTHONPATH, so Python imports this file at start-up in
every process of the run (the ``simpletuner`` CLI, ``accelerate launch``, the training worker).
With ``LONGCAT_FAULT_BSA_FAIL_AT=N`` set, once ``simpletuner_longcat_video.attention_bsa`` has
been imported its availability probe says yes (this machine has no CUDA for the Triton kernel)
and the kernel call it makes is replaced: launches 1..N-1 return dense attention, as a working
kernel at sparsity 0 would, and launch N raises the error a GPU driver gives for a bad launch.
Everything around the kernel call is the real code: host loop, family, attention seam, adapter.
"""

import os
import sys

TARGET = "simpletuner_longcat_video.attention_bsa"
FAIL_AT = int(os.environ.get("LONGCAT_FAULT_BSA_FAIL_AT", "0") or 0)


def _inject(module) -> None:
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


class _Watcher:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
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
            _inject(module)

        spec.loader.exec_module = exec_and_inject
        sys.meta_path.remove(self)
        return spec


if FAIL_AT > 0:
    sys.meta_path.insert(0, _Watcher())
