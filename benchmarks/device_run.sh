#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels (diffusers, peft, this package),
# then run the block-sparse correctness script and the benchmarks. Output tables land in $OUT.
# LCV_WHEELS names the carried wheel folder (default .whl; e.g. .whl1 from device_wheels.sh).
# Usage (device tool, carry [".whl"]): bash benchmarks/device_run.sh [bsa|dense|dit|pipeline|train|multi|validation|sampling|all] [train rows | multi modes | script arguments]
# The full-size host run: bash benchmarks/device_run.sh full-1 | full-2 | full-3 | full-4 | full-poll [seconds] (see device_full.sh).
# `multi` needs the nvidia-h200-x2 kind (two GPUs of one host).
set -uo pipefail
what=${1:-all}
export PYTHONUNBUFFERED=1
if [[ $what == full-* ]]; then
    exec bash benchmarks/device_full.sh "${what#full-}" "${2:-}"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${LCV_WHEELS:-.whl}/*.whl || exit 1
export PYTHONPATH=/tmp/site
cd /tmp  # never import from the checkout root: its kernels/ folder would shadow the PyPI `kernels`
repo=$OLDPWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, diffusers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
status=0
if [[ $what == bsa || $what == all ]]; then
    python3 "$repo/benchmarks/gpu_check_bsa.py" 2>&1 | tee "$OUT/gpu_check_bsa.txt" || status=1
    python3 "$repo/benchmarks/bsa.py" 2>&1 | tee "$OUT/bsa.txt" || status=1
fi
if [[ $what == dense || $what == all ]]; then
    python3 "$repo/benchmarks/gpu_check_dense.py" 2>&1 | tee "$OUT/gpu_check_dense.txt" || status=1
fi
if [[ $what == dit || $what == all ]]; then
    python3 "$repo/benchmarks/dit_step.py" 2>&1 | tee "$OUT/dit_step.txt" || status=1
fi
if [[ $what == train ]]; then
    # The built-in comparison imports SimpleTuner, so its wheel and the few imports the GPU image
    # lacks (boto3 & co, optimum-quanto, torchao) travel in .whl too.
    python3 "$repo/benchmarks/train_step.py" --rows "${2:-plain,swap8}" ${3:-} 2>&1 | tee "$OUT/train_step.txt" || status=1
fi
if [[ $what == multi ]]; then
    # NVLink multicast stays off in every NCCL launch (multi_gpu.py sets these for its children too).
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    nvidia-smi topo -m | head -5
    python3 "$repo/benchmarks/multi_gpu.py" --modes "${2:-single-480,ddp,fsdp2,single-720,cp2}" ${3:-} 2>&1 | tee "$OUT/multi_gpu.txt" || status=1
fi
if [[ $what == validation ]]; then
    # Extra arguments go to validation_video.py (e.g. "--backend auto --compile").
    python3 "$repo/benchmarks/validation_video.py" ${2:---backend auto --compile} 2>&1 | tee "$OUT/validation_video.txt" || status=1
fi
if [[ $what == sampling ]]; then
    python3 "$repo/benchmarks/sampling_step.py" ${2:-} 2>&1 | tee "$OUT/sampling_step.txt" || status=1
fi
if [[ $what == pipeline || $what == all ]]; then
    python3 "$repo/benchmarks/gpu_check_pipeline.py" 2>&1 | tee "$OUT/gpu_check_pipeline.txt" || status=1
fi
exit $status
