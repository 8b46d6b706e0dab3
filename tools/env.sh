#!/usr/bin/env bash
# Build (once per machine) and print the path of the project environment.
#
# The environment lives outside the checkout, keyed by the hash of the lock file, so every fresh
# clone (CI included) reuses it instead of rebuilding ~7 GB. A build that dies half-way leaves no
# marker and is redone from scratch; concurrent builds are serialised with flock.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SIMPLETUNER_LONGCAT_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simpletuner-longcat-video}
key=$(cat "$root/constraints.txt" "$root/requirements-env.txt" | sha256sum | cut -c1-16)
env_dir="$cache/env-$key"
marker="$env_dir/.complete"

log() { echo "[env] $*" >&2; }

if [[ -f "$marker" ]]; then
    echo "$env_dir"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock-$key"
flock 9
if [[ -f "$marker" ]]; then  # another process built it while we waited
    echo "$env_dir"
    exit 0
fi

python_bin=$("$root/tools/find_python.sh")
log "building $env_dir with $python_bin (first time on this machine: ~6 minutes, ~7 GB)"
start=$(date +%s)
rm -rf "$env_dir"
"$python_bin" -m venv "$env_dir"
# The machine's pip config points at a local CPU torch whose torchvision ops do not register;
# bypass it so torch/torchvision come from PyPI as the lock says.
(
    export PIP_CONFIG_FILE=/dev/null
    unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT
    "$env_dir/bin/python" -m pip install --quiet --upgrade pip
    "$env_dir/bin/python" -m pip install --quiet -c "$root/constraints.txt" -r "$root/requirements-env.txt"
)
# From a neutral folder (python reads the script from stdin with the cwd on sys.path), so nothing in
# the checkout can stand in for an installed package.
(cd "${TMPDIR:-/tmp}" && "$env_dir/bin/python" - <<'PY'
# Fail the build now, not in the first test, if the known-bad combinations slipped in.
import torchvision.ops  # noqa: F401  (torchvision::nms must register)
import transformers, diffusers, simpletuner.helpers.models.registry  # noqa: F401,E401
PY
)
end=$(date +%s)
size=$(du -sh "$env_dir" | cut -f1)
printf 'built %s in %ss, %s\n' "$(date -Is)" "$((end - start))" "$size" > "$env_dir/.build-info"
touch "$marker"
log "done in $((end - start)) s, $size"
echo "$env_dir"
