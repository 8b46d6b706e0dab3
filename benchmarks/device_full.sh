#!/usr/bin/env bash
# The full-size run through the host on the lent GPU machine (benchmarks/full_size_run.py), in
# calls that each carry one share of the wheels (the whole set is ~190 MB; a call carries 64 MiB):
#   full-1  carry [".whl1"]: install; build the full-size checkpoint + dataset in the background;
#           run the group-offload probe meanwhile; wait for the build
#   full-2, full-3  carry [".whl2"], [".whl3"]: install
#   full-4  carry [".whl4"]: install; start every host run in the background (main, resume, the
#           memory recipes side by side); wait up to ~9 minutes
#   poll    wait up to ~9 minutes more; results and log tails land in $OUT each time
# LCV_RUNS picks the runs (full_size_run.py --stage, default "runs": all of them), e.g.
# LCV_RUNS=recipe:validation,recipe:swap8; LCV_QUICK=1 makes full-1 skip the group-offload probe
# and return without waiting for the build (the later calls' installs overlap it). LONGCAT_PHASE_PROFILE=N
# profiles training step N of each run (benchmarks/phase_probe; the table comes back as *.profile.txt).
# Made by benchmarks/device_wheels.sh on the development machine. The machine keeps /root/lcv and
# /tmp/site only while it stays warm (30 s after a call): send the next call at once.
set -uo pipefail
part=$1
shift || true
root=${LCV_ROOT:-/root/lcv}
site=${LCV_SITE:-/tmp/site}
tiny=${LCV_TINY:+--tiny}  # LCV_TINY=1: the same calls on a CPU with a tiny checkpoint (a rehearsal)
export PYTHONUNBUFFERED=1 PYTHONPATH=$site PATH=$site/bin:$PATH
mkdir -p $root
install_part() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site ".whl$1"/*.whl || exit 1
    # pip --target does not make $site a site dir, so the plugin's .pth start-up hook would never
    # run; the interpreter's own site-packages gets one line that processes $site's .pth files.
    pth="$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz-longcat-device-site.pth"
    [[ -f $pth ]] || echo "import site; site.addsitedir('$site')" > "$pth"
}
snapshot() {  # what a call killed at its time limit still brings back: results, logs, phase events
    cp $root/results.json "$OUT/full_size_results.json" 2>/dev/null
    cp $root/LongCat-Video/BUILD.json "$OUT/build.json" 2>/dev/null
    for log in $root/*.log $root/recipe-*/train-*.log; do
        [[ -f $log ]] && tail -c 60000 "$log" | sed 's/\x1b\[[0-9;]*m//g' > "$OUT/$(basename "$(dirname "$log")")-$(basename "$log")"
    done
    for probe in $root/probe-*.jsonl* $root/recipe-*/probe-*.jsonl*; do
        [[ -f $probe ]] && cp "$probe" "$OUT/$(basename "$(dirname "$probe")")-$(basename "$probe")"
    done
}
wait_for() {  # wait_for FILE SECONDS
    local waited=0
    while [[ ! -f $1 && $waited -lt $2 ]]; do
        sleep 5; waited=$((waited + 5))
        (( waited % 20 == 0 )) && snapshot
    done
}
report() {
    snapshot
    ls $root/output/validation_images 2>/dev/null | head
    tail -5 $root/runs.log 2>/dev/null
    nvidia-smi --query-gpu=memory.used --format=csv,noheader
}
case $part in
    1)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        df -h / /root /tmp | tail -3
        install_part 1
        rm -rf $root/repo && mkdir -p $root/repo && cp -r benchmarks examples $root/repo/
        (cd /tmp && setsid nohup python3 $root/repo/benchmarks/full_size_run.py --stage build --root $root $tiny \
            > $root/build.log 2>&1 &)
        if [[ -z ${LCV_QUICK:-} ]]; then
            (cd /tmp && python3 $root/repo/benchmarks/group_offload_probe.py 2>&1 | grep -v Warning | tee "$OUT/group_offload_probe.txt")
            wait_for $root/LongCat-Video/BUILD.json 420
        fi
        tail -3 $root/build.log; df -h / | tail -1
        report
        ;;
    2 | 3)
        install_part "$part"
        ;;
    4)
        install_part 4
        (cd /tmp && python3 -c "import simpletuner, simpletuner_longcat_video, diffusers, peft; print('host', simpletuner.__file__)")
        rm -f $root/DONE
        # quoted: a run spec holds ';' between groups
        (cd /tmp && setsid nohup bash -c "while [[ ! -f $root/LongCat-Video/BUILD.json ]]; do sleep 5; done; \
            python3 $root/repo/benchmarks/full_size_run.py --stage '${LCV_RUNS:-runs}' --root $root $tiny; touch $root/DONE" \
            > $root/runs.log 2>&1 &)
        wait_for $root/DONE 540
        report
        ;;
    poll)
        wait_for $root/DONE "${1:-560}"
        report
        ;;
esac
