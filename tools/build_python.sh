#!/usr/bin/env bash
# Fallback for machines without Python >=3.12: build CPython 3.13 from Debian's source package
# (about 3 minutes on 2 cores). Uses apt's own configured sources; needs root for the -dev packages.
set -euo pipefail

prefix=${XDG_CACHE_HOME:-$HOME/.cache}/simpletuner-longcat-video/cpython-3.13
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

apt-get update -qq
apt-get install -y -qq build-essential libssl-dev zlib1g-dev libbz2-dev liblzma-dev libsqlite3-dev \
    libffi-dev libreadline-dev uuid-dev xz-utils >/dev/null
cd "$work"
# The orig tarball lives in the pool of the mirror apt already uses; read the mirror from apt.
mirror=$(apt-get indextargets --format '$(REPO_URI)' 2>/dev/null | grep -m1 -E '/debian/?$' || true)
[[ -n "$mirror" ]] || { echo "cannot find a Debian mirror in apt's sources" >&2; exit 1; }
curl -fsSL -o cpython.tar.xz "${mirror%/}/pool/main/p/python3.13/python3.13_3.13.5.orig.tar.xz"
tar -xf cpython.tar.xz
cd Python-3.13*/
./configure --prefix="$prefix" --with-ensurepip=install >/dev/null
make -j"$(nproc)" >/dev/null
make install >/dev/null
