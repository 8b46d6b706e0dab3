#!/usr/bin/env bash
# Print an interpreter the host accepts (>=3.12,<3.15). Prefer one already on the machine
# (PYTHON, python3.12/3.13 on PATH, pyenv's), else build CPython 3.13 from Debian's source.
set -euo pipefail

ok() { "$1" -c 'import sys, venv, ensurepip, ssl, sqlite3, lzma, bz2, ctypes; sys.exit(not ((3, 12) <= sys.version_info[:2] < (3, 15)))' 2>/dev/null; }

candidates=()
[[ -n "${PYTHON:-}" ]] && candidates+=("$PYTHON")
for name in python3.12 python3.13 python3.14; do
    command -v "$name" >/dev/null 2>&1 && candidates+=("$(command -v "$name")")
done
if command -v pyenv >/dev/null 2>&1; then
    pyroot=$(pyenv root)
    for dir in "$pyroot"/versions/3.12.* "$pyroot"/versions/3.13.*; do
        [[ -x "$dir/bin/python3" ]] && candidates+=("$dir/bin/python3")
    done
fi
built=${XDG_CACHE_HOME:-$HOME/.cache}/simpletuner-longcat-video/cpython-3.13/bin/python3.13
candidates+=("$built")

for py in "${candidates[@]}"; do
    if [[ -x "$py" ]] && ok "$py"; then
        echo "$py"
        exit 0
    fi
done

echo "[env] no Python >=3.12 found; building CPython 3.13 from Debian's source package" >&2
"$(dirname "$0")/build_python.sh" >&2
ok "$built" || { echo "[env] the CPython build did not produce a working $built" >&2; exit 1; }
echo "$built"
