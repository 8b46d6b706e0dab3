"""Which fused kernel the seam's dense attention runs on this GPU, eager and compiled (fullgraph), and its speed.

    python benchmarks/gpu_check_dense.py

Prints one line per mode: the CUDA kernels the profiler saw (cuDNN's carry ``cudnn`` in their
names, flash's ``flash``), fwd+bwd ms at 24x30x52 tokens, and the largest difference to PyTorch's
default SDPA choice. Fails when the compiled call runs a different kernel family than the eager one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from simpletuner_longcat_video.core.attention import dense_attention


def _kernels(fn, *args) -> str:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args).sum().backward()
        torch.cuda.synchronize()
    names = {e.key.lower() for e in prof.key_averages()}
    return ",".join(
        sorted(family for family in ("cudnn", "flash", "efficient", "mem_eff") if any(family in n for n in names))
    )


def _ms(fn, *args, reps: int = 5) -> float:
    for _ in range(2):
        fn(*args).sum().backward()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(*args).sum().backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    torch.manual_seed(0)
    tokens = 24 * 30 * 52
    q, k, v = (
        torch.randn(1, 32, tokens, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    reference = F.scaled_dot_product_attention(q, k, v)
    compiled = torch.compile(dense_attention, fullgraph=True)
    families = {}
    for mode, fn in (
        ("default SDPA", F.scaled_dot_product_attention),
        ("eager", dense_attention),
        ("compiled", compiled),
    ):
        families[mode] = _kernels(fn, q, k, v)
        diff = (fn(q, k, v).float() - reference.float()).abs().max().item()
        print(f"{mode:13s} kernels={families[mode]:20s} fwd+bwd {_ms(fn, q, k, v):7.1f} ms  max|diff| {diff:.3e}")
    if families["compiled"] != families["eager"]:
        raise SystemExit(f"compiled dense attention runs {families['compiled']}, eager {families['eager']}")


if __name__ == "__main__":
    main()
