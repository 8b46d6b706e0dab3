#!/usr/bin/env bash
# Install this checkout into the project environment the way a user installs it: a real wheel
# (not editable), so the .pth hook, the entry points and the bundled kernels/ are what users get.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
env_dir=$("$root/tools/env.sh")
cd "$root"
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$env_dir/bin/python" -m pip install --quiet --no-deps \
    --no-build-isolation --force-reinstall --no-cache-dir "$root"
"$env_dir/bin/python" -c "import simpletuner_longcat_video as p, sys; sys.exit(0 if 'site-packages' in p.__file__ else 1)" \
    || { echo "[install] simpletuner_longcat_video did not install into $env_dir" >&2; exit 1; }
