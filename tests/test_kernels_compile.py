"""The block-sparse kernels compile for the H100/H200 (sm_90) at LongCat's real sizes, on a CPU.

The interpreter (tests/test_kernels_block_sparse.py) runs the kernels' arithmetic but not Triton's
compiler, which has rules of its own (a loop-carried value must keep its type, constexpr branches,
layouts): a kernel can pass every interpreted test and still fail to compile on the GPU. Triton
compiles to PTX and runs its bundled ptxas without a driver, so the kernels are compiled here for
sm_90 with chunk (4, 4, 8), head dim 128, bf16, on whole and partial grids, for the config each
kernel tries first. A fresh interpreter does it (Triton must not be in interpreter mode), one JSON
line for all.
"""

from __future__ import annotations

import json
import sys

import pytest
from test_kernels_block_sparse import kernel_worker_report

# (kernel, partial grid): each kernel's first config on a whole and a partial grid
COMPILES = [(name, partial) for name in ("fwd", "dkdv", "dq") for partial in (False, True)]
POINTERS = {
    "LSE": "*fp32",
    "DELTA": "*fp32",
    "KV_LIST": "*i32",
    "KV_COUNT": "*i32",
    "Q_LIST": "*i32",
    "Q_COUNT": "*i32",
    "REL_Q": "*i32",
    "REL_K": "*i32",
}


def _compile(name: str, partial: bool) -> dict:
    import triton
    from simpletuner_longcat_video.kernels import triton_bsa as tk
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, configs = tk._KERNELS[name]
    chunk, tile = 128, 64 if partial else 128
    valid = [c for c in configs if c.num_stages > 1 and tk._config_valid(c, chunk, tile, tk._PROGRAM_SPLIT[name])]
    cfg = valid[0]
    consts = {
        "CT": 4, "CH": 4, "CW": 8, "TILE": tile, "HEAD_DIM": 128, "Q_PARTIAL": partial, "K_PARTIAL": partial,
        "OFF64": False, "DOT_PREC": "tf32", "UPCAST": False, **cfg.kwargs,
    }  # fmt: skip
    signature = {}
    for arg in kernel.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in POINTERS:
            signature[arg] = POINTERS[arg]
        elif arg[0].isupper() and arg not in ("H", "W"):  # the q, k, v, dO, output tensors
            signature[arg] = "*bf16"
        else:
            signature[arg] = "fp32" if arg.endswith("scale") else "i32"
    source = ASTSource(kernel, signature, constexprs={a: v for a, v in consts.items() if a in kernel.arg_names})
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return {"config": str(cfg), "cubin_bytes": len(compiled.asm["cubin"])}


def _worker_main() -> None:
    results = {}
    for case in COMPILES:
        try:
            results[repr(case)] = {"ok": True, **_compile(*case)}
        except Exception as exc:  # reported per case; the test prints the compiler's message
            results[repr(case)] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:]}
    print("COMPILED " + json.dumps(results), flush=True)


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    return kernel_worker_report(__file__, "COMPILED ", interpret=False)


@pytest.mark.parametrize("case", COMPILES, ids=[f"{c[0]}-{'partial' if c[1] else 'whole'}" for c in COMPILES])
def test_kernel_compiles_for_sm90(compiled, case):
    result = compiled[repr(case)]
    assert result["ok"], result.get("error")
    assert result["cubin_bytes"] > 0


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
