#!/usr/bin/env bash
# What the WebUI test needs besides the Python environment, installed only when missing:
# Debian's Chromium (+ ChromeDriver), and the npm packages the host's web UI loads from CDNs,
# which the test browser is served locally because this machine's network is closed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "[browser] $*" >&2; }

if [[ ! -x /usr/bin/chromium ]]; then
    log "installing Debian's chromium and chromium-driver"
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi

if ! command -v npm >/dev/null; then
    log "installing Debian's npm"
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq npm >/dev/null
fi

assets="$root/tools/webui-assets"
if [[ ! -f "$assets/node_modules/.package-lock.json" || "$assets/package-lock.json" -nt "$assets/node_modules/.package-lock.json" ]]; then
    log "installing the web UI's npm packages into $assets/node_modules"
    (cd "$assets" && npm ci --no-audit --no-fund --loglevel=error)
fi
