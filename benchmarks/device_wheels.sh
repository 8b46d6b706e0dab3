#!/usr/bin/env bash
# Wheels for the GPU machine's full-size host run (benchmarks/device_full.sh), in four shares of
# at most ~58 MB (a device call carries 64 MiB). The GPU image has torch, transformers, accelerate,
# numpy, imageio, ... (see the device tool's KINDS.md); these are what SimpleTuner's `train` path
# imports beyond it (found by running the demo here with every package the image lacks hidden, and
# un-hiding what the run needed, one at a time). Versions are this project's lock (constraints.txt)
# except imageio-ffmpeg 0.6.0 (its 0.8.1 wheel alone is 68 MB; the host only needs its ffmpeg).
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir=$(tools/env.sh)
download() {  # download DIR SPEC...
    local dir=$1; shift
    mkdir -p "$dir"
    PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform any -d "$dir" "$@"
}
rm -rf .whl1 .whl2 .whl3 .whl4
download .whl1 diffusers==0.42.1 peft==0.21.2 optimum-quanto==0.2.7 torchao==0.18.0 boto3==1.44.5 \
    botocore==1.44.5 s3transfer==0.19.3 jmespath==1.1.0 imageio-ffmpeg==0.6.0
PIP_CONFIG_FILE=/dev/null "$env_dir/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w .whl1 .
download .whl2 spacy==3.8.18 blis==1.3.4
download .whl3 wandb==0.31.0 av==19.0.2
download .whl4 simpletuner==4.10.1 thinc==8.3.14 py3langid==0.4.0 pydantic==2.14.3 \
    pydantic_core==2.50.4 srsly==2.5.6 preshed==3.0.15 pypinyin==0.55.0 wcwidth==0.9.4 fastapi==0.165.0 \
    starlette==1.10.0 annotated-types==0.8.0 typing-inspection==0.4.5 beautifulsoup4==4.15.0 \
    catalogue==2.0.10 confection==1.3.4 cymem==2.0.16 murmurhash==1.0.16 wasabi==1.1.3 weasel==1.0.1 \
    ftfy==6.3.1 googleapis-common-protos==1.76.0 hangul-romanize==0.1.0 librosa==1.0.0 loguru==0.7.3 \
    num2words==0.5.14 opentelemetry-api==1.45.2 opentelemetry-exporter-http-transport==0.66b2 \
    opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
    opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 \
    opentelemetry-semantic-conventions==0.66b2 platformdirs==4.14.7 skrample==0.5.3 soxr==1.1.0 toml==0.10.2 \
    trainingsample==0.3.2
# atomicwrites 1.4.1 ships only as an sdist: build its (pure-Python) wheel here.
PIP_CONFIG_FILE=/dev/null python3 -m pip wheel -q --no-deps -w .whl4 atomicwrites==1.4.1
du -sh .whl1 .whl2 .whl3 .whl4
