#!/usr/bin/env bash
# The GPU check: build for this GPU, run the GPU tests, benchmark. Made for one short lease of
# a fresh GPU machine with no network (python3 with torch, Triton and pytest; nvcc): the stage
# limits add up to 380 s, so two runs and the machine's start fit in 15 minutes.
#
# Usage: OUT=/path/to/results bash benchmarks/gpu_check.sh [--help]
#
# Each stage runs under `timeout -s ABRT`: at its limit Python's faulthandler (on in every
# Python process here) prints each thread's stack into the stage's log before the process
# dies. A stage that fails or runs out of time makes the script exit 1; the others still run.
#   detect (30 s): the interpreter (PYTHON, else python3, else python), package versions,
#     whether pip and a writable site-packages are there, the GPU's compute capability. Its
#     stderr goes to env.txt. A GPU that nvidia-smi lists but torch cannot use fails here
#     rather than falling back to the CPU.
#   build (100 s): FSAM_FUSED_CUDA=1 (no CUDA ops is an error, not a CPU-only build) and
#     TORCH_CUDA_ARCH_LIST=<the detected arch>, then `pip install --no-index --no-deps
#     --no-build-isolation --disable-pip-version-check -e .`: _C is compiled once, into the
#     checkout, and fsam_fused.kernels and fsam_fused.bench map onto kernels/ and benchmarks/.
#     Without pip, or with a read-only or externally managed site-packages: `setup.py
#     build_ext --inplace` and PYTHONPATH=<checkout> (fsam_fused.kernels then loads through
#     the triton backend's checkout fallback; fsam_fused.bench is not mapped, and
#     `python -m benchmarks` runs the benchmark either way). build.log says which way ran.
#   import check (20 s): fsam_fused, its _C, fsam_fused.kernels (and fsam_fused.bench) come
#     from this checkout, and _C holds CUDA kernels for the detected arch.
#   pytest -m gpu (140 s, about 95 used on an H200; most of the first Triton compiles happen
#     here): -vv -l --durations=0, --junitxml, --continue-on-collection-errors (a test module
#     that cannot be imported there fails the stage without stopping the GPU tests),
#     -o faulthandler_timeout=45 (the stacks of a test stuck in C code) and, through
#     pytest-timeout, --timeout=60 per test (when pytest-timeout is missing, the log says so and
#     only the two others bound the run).
#     Through pytest-xdist, -n 1: the tests run in one worker process, replaced when a test
#     kills it, so a test that crashes the interpreter fails alone and the others still run
#     (the first GPU run lost half its tests to one segfault); without xdist the log says so,
#     and a crash ends the stage with the crashing test named. A failed test that leaves the
#     CUDA context poisoned ends its worker too (tests/conftest.py), so it is listed twice: its
#     own failure with the traceback, then "worker crashed while running" it.
#   fsam-bench (90 s, 57 used on an H200 before the captured-graph rows): the GPU presets
#     (resnet18, vit_b16; fp32 and bf16), each backend eager and replayed from a CUDA graph,
#     --e2e, and --profile (each backend's host time by call on resnet18). Triton's compile
#     cache, TRITON_CACHE_DIR (default: a temp dir shared by the stages, removed at exit), hands
#     the kernels the tests compiled over to the benchmark.
# Without a GPU (none listed by nvidia-smi, none seen by torch), the CPU fallback: no build,
# no GPU tests, a quick fsam-bench on the CPU (300 s limit).
#
# Under $OUT (default ./gpu_check_out), at most 8 files: env.txt build.log pytest_gpu.log
# pytest_gpu.xml (GPU only) bench.log results.json results.png summary.txt. Any text file
# over 4 MiB is cut to its first 1 MiB and last 3 MiB, with a line that says so; a last check
# fails the run if $OUT holds more than 8 files, one over 16 MiB or over 64 MiB in all.
# summary.txt (failing tests, benchmark tables, each stage's verdict and time) is printed last.
#
# Environment: OUT, PYTHON, TRITON_CACHE_DIR, MAX_JOBS (default: all cores); stage limits in
# seconds DETECT_LIMIT_S, BUILD_LIMIT_S, IMPORT_LIMIT_S, PYTEST_LIMIT_S, BENCH_LIMIT_S, and
# TEST_TIMEOUT_S (per test; faulthandler_timeout is three quarters of it).
set -uo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "gpu_check.sh takes no arguments (got: $*); see --help" >&2
    exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_out}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if [[ -z "$PYTHON" ]]; then
    echo "gpu_check: neither python3 nor python is on PATH; set PYTHON to the interpreter that has torch" >&2
    exit 2
fi
DETECT_LIMIT_S="${DETECT_LIMIT_S:-30}"
BUILD_LIMIT_S="${BUILD_LIMIT_S:-100}"
IMPORT_LIMIT_S="${IMPORT_LIMIT_S:-20}"
PYTEST_LIMIT_S="${PYTEST_LIMIT_S:-140}"
BENCH_LIMIT_S="${BENCH_LIMIT_S:-90}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-60}"
# A shared 2-core CPU is far slower than a GPU machine; the 380 s promise is for the GPU.
CPU_BENCH_LIMIT_S=300
# What the device machine hands back: 8 files of at most 16 MiB, 64 MiB together. Six text
# files capped at 4 MiB stay well inside that.
OUT_MAX_FILES=8
OUT_MAX_BYTES=$((16 << 20))
OUT_MAX_TOTAL_BYTES=$((64 << 20))
LOG_CAP_BYTES=$((4 << 20))
OUTPUTS=(env.txt build.log pytest_gpu.log pytest_gpu.xml bench.log results.json results.png summary.txt)

mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
for name in "${OUTPUTS[@]}"; do
    rm -f "${OUT:?}/$name"  # an earlier run's results must not pass for this run's
done
cd "$REPO" || exit 1
ulimit -c 0  # a stage ended by SIGABRT must not leave a core dump of a CUDA process in the checkout
WORK="$(mktemp -d)" || exit 1
trap 'rm -rf "$WORK"' EXIT
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton_cache}"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
STAGES="$WORK/stages.txt"
FAILED_STAGES=()
echo "gpu_check: stage limits on a GPU: detect ${DETECT_LIMIT_S} s, build ${BUILD_LIMIT_S} s," \
    "import check ${IMPORT_LIMIT_S} s, pytest -m gpu ${PYTEST_LIMIT_S} s, fsam-bench ${BENCH_LIMIT_S} s:" \
    "$((DETECT_LIMIT_S + BUILD_LIMIT_S + IMPORT_LIMIT_S + PYTEST_LIMIT_S + BENCH_LIMIT_S)) s in all"

# record STAGE STATUS [START LIMIT [DETAIL]]: a row of the summary's stage table. STATUS is an
# exit status (124 and 137: `timeout` ended it), "skipped", or a verdict word of a check.
record() {
    local verdict time=""
    case "$2" in
        0) verdict="ok" ;;
        skipped) verdict="skipped" ;;
        124 | 137) verdict="TIMED OUT" ;;
        *[!0-9]*) verdict="$2" ;;
        *) verdict="FAILED (exit $2)" ;;
    esac
    [[ "$2" == 0 || "$2" == skipped ]] || FAILED_STAGES+=("$1")
    [[ -n "${3:-}" ]] && time="$((SECONDS - $3))/$4 s"
    printf '%-34s %-16s %-12s %s\n' "$1" "$verdict" "$time" "${5:-}" >> "$STAGES"
    echo "gpu_check: $1: $verdict${5:+ ($5)}"
}

# run_bounded LIMIT STDOUT STDERR COMMAND...: COMMAND with its output appended to the two
# files (they may be one), ended after LIMIT seconds by SIGABRT (faulthandler prints the
# stacks), then by SIGKILL 10 s later if it still runs.
run_bounded() {
    local limit="$1" stdout="$2" stderr="$3"
    shift 3
    printf '+ %s\n' "$*" >> "$stderr"
    timeout -s ABRT -k 10 "$limit" "$@" >> "$stdout" 2>> "$stderr"
}

# cap_log FILE: a file over LOG_CAP_BYTES keeps its first quarter and the rest from its end.
cap_log() {
    local size head tail
    [[ -f "$1" ]] || return 0
    size="$(wc -c < "$1")"
    ((size > LOG_CAP_BYTES)) || return 0
    head=$((LOG_CAP_BYTES / 4))
    tail=$((LOG_CAP_BYTES - head - 200))
    {
        head -c "$head" "$1"
        printf '\n[gpu_check: %d bytes cut here, so that this file stays under %d bytes]\n' \
            $((size - head - tail)) "$LOG_CAP_BYTES"
        tail -c "$tail" "$1"
    } > "$WORK/capped" && mv "$WORK/capped" "$1"
}

# ---------------------------------------------------------------------------- detect
start=$SECONDS
DETECTED="$(timeout -s ABRT -k 5 "$DETECT_LIMIT_S" "$PYTHON" - 2> "$WORK/detect.err" <<'EOF'
import importlib.metadata
import os
import sys
import sysconfig


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


print(f"python={sys.executable} {sys.version.split()[0]}")
for dist in ("torch", "triton", "numpy", "pytest", "pytest-timeout", "pytest-xdist", "pip", "setuptools"):
    print(f"{dist}={version(dist)}")
site = sysconfig.get_paths()["purelib"]
# pip refuses to install into an interpreter marked EXTERNALLY-MANAGED (PEP 668) outside a venv.
marker = os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")
managed = sys.prefix == sys.base_prefix and os.path.exists(marker)
state = "externally-managed" if managed else "writable" if os.access(site, os.W_OK) else "read-only"
print(f"site_packages={state} {site}")
import torch

print(f"torch_cuda={torch.version.cuda}")
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"gpu={torch.cuda.get_device_name()}")
    print(f"arch={major}.{minor}")
EOF
)"
detect_status=$?
detected() { sed -n "s/^$1=//p" <<< "$DETECTED" | head -n 1; }
ARCH="$(detected arch)"
LISTED_GPUS=""
if command -v nvidia-smi > /dev/null; then
    LISTED_GPUS="$(timeout 20 nvidia-smi -L 2>&1 | grep '^GPU ')"
fi
{
    echo "date: $(date -u +%FT%TZ)"
    echo "repo: $REPO"
    if commit="$(git rev-parse --short HEAD 2> /dev/null)"; then
        git diff --quiet HEAD || commit+=" + uncommitted changes"
    fi
    echo "commit: ${commit:-unknown}"
    echo "host: $(uname -srm), $(nproc) cores"
    echo "interpreter asked for: $PYTHON"
    echo "$DETECTED"
    echo "detection exit status: $detect_status"
    echo "detection stderr:"
    cat "$WORK/detect.err"
    echo "nvcc: $(command -v nvcc || echo missing)"
    command -v nvcc > /dev/null && timeout 20 nvcc --version 2>&1 | tail -n 2
    echo "ninja: $(command -v ninja || echo 'missing (torch builds without it, one file at a time)')"
    echo "TRITON_CACHE_DIR: $TRITON_CACHE_DIR"
    echo "nvidia-smi:"
    if command -v nvidia-smi > /dev/null; then timeout 20 nvidia-smi 2>&1; else echo "not on PATH"; fi
} > "$OUT/env.txt"
if [[ -s "$WORK/detect.err" ]]; then
    echo "gpu_check: the detection wrote to stderr (all of it is in env.txt):"
    tail -n 20 "$WORK/detect.err"
fi

BENCH_STDOUT="$WORK/bench_tables.txt"
: > "$BENCH_STDOUT"
if [[ $detect_status -ne 0 ]]; then
    record "detect" "$detect_status" "$start" "$DETECT_LIMIT_S" "see env.txt; nothing else can run"
    MODE=none
elif [[ -z "$ARCH" && -n "$LISTED_GPUS" ]]; then
    record "detect" "FAILED" "$start" "$DETECT_LIMIT_S" "nvidia-smi lists a GPU that torch cannot use; see env.txt"
    MODE=none
elif [[ -n "$ARCH" ]]; then
    record "detect" 0 "$start" "$DETECT_LIMIT_S" "$(detected gpu), compute capability $ARCH"
    MODE=gpu
else
    record "detect" 0 "$start" "$DETECT_LIMIT_S" "no CUDA GPU: the CPU fallback runs"
    MODE=cpu
fi
cap_log "$OUT/env.txt"

# ----------------------------------------------------------------------------- GPU
if [[ $MODE == gpu ]]; then
    export FSAM_FUSED_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    if [[ "$(detected pip)" != missing && "$(detected site_packages)" == writable* ]]; then
        BUILD_WAY=editable
        BUILD=("$PYTHON" -m pip install --no-index --no-deps --no-build-isolation
            --disable-pip-version-check -v -e .)
        echo "gpu_check: building with an editable install: _C in place, packages mapped" >> "$OUT/build.log"
    else
        BUILD_WAY=pythonpath
        BUILD=("$PYTHON" setup.py build_ext --inplace)
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check: pip $(detected pip), site-packages $(detected site_packages): building in place" \
            "with setup.py build_ext --inplace, imports from PYTHONPATH=$PYTHONPATH" >> "$OUT/build.log"
    fi
    echo "gpu_check: FSAM_FUSED_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$MAX_JOBS" >> "$OUT/build.log"
    start=$SECONDS
    run_bounded "$BUILD_LIMIT_S" "$OUT/build.log" "$OUT/build.log" "${BUILD[@]}"
    record "build (sm_${ARCH/./}, $BUILD_WAY)" $? "$start" "$BUILD_LIMIT_S"

    start=$SECONDS
    run_bounded "$IMPORT_LIMIT_S" "$OUT/build.log" "$OUT/build.log" "$PYTHON" - "$REPO" "$ARCH" "$BUILD_WAY" <<'EOF'
"""Where fsam_fused and the packages setup.py maps come from; whether _C has this GPU's kernels."""
import importlib
import re
import sys
from pathlib import Path

repo, arch, build_way = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3]
import fsam_fused
import fsam_fused.backends.triton_backend as triton_backend
from fsam_fused import _ops

modules = {"fsam_fused": fsam_fused, "fsam_fused._C": _ops._C, "fsam_fused.kernels": triton_backend.kernels}
if build_way == "editable":
    modules["fsam_fused.bench"] = importlib.import_module("fsam_fused.bench")
problems = []
for name, module in modules.items():
    path = Path(module.__file__).resolve()
    print(f"{name}: {path}")
    if repo not in path.parents:
        problems.append(f"{name} comes from {path}, outside {repo}")
print(f"_C has CUDA kernels: {_ops.has_cuda_kernels()}; built for: {_ops.cuda_arch_list!r}")
if not _ops.has_cuda_kernels():
    problems.append("fsam_fused._C has no CUDA kernels")
elif arch not in re.split(r"[;\s]+", _ops.cuda_arch_list):
    problems.append(f"fsam_fused._C was built for {_ops.cuda_arch_list!r}, not for this GPU's {arch}")
if problems:
    sys.exit("import check FAILED: " + "; ".join(problems))
print("import check ok")
EOF
    record "import check" $? "$start" "$IMPORT_LIMIT_S"
    cap_log "$OUT/build.log"

    PYTEST=(-m gpu -vv -l -p no:cacheprovider --durations=0 --continue-on-collection-errors
        --junitxml="$OUT/pytest_gpu.xml" -o "faulthandler_timeout=$((TEST_TIMEOUT_S * 3 / 4))")
    if [[ "$(detected pytest-timeout)" != missing ]]; then
        PYTEST+=(--timeout="$TEST_TIMEOUT_S" --timeout-method=signal)
    else
        echo "gpu_check: pytest-timeout is missing: no per-test timeout; faulthandler_timeout prints the" \
            "stacks of a slow test and the ${PYTEST_LIMIT_S} s stage limit ends the run" | tee -a "$OUT/pytest_gpu.log"
    fi
    if [[ "$(detected pytest-xdist)" != missing ]]; then
        PYTEST+=(-n 1 --max-worker-restart=20)
    else
        echo "gpu_check: pytest-xdist is missing: the tests run in this process, and a test that crashes" \
            "the interpreter ends the stage" | tee -a "$OUT/pytest_gpu.log"
    fi
    start=$SECONDS
    run_bounded "$PYTEST_LIMIT_S" "$OUT/pytest_gpu.log" "$OUT/pytest_gpu.log" "$PYTHON" -m pytest "${PYTEST[@]}" tests
    status=$?
    last_started="$(grep -o '^tests/[^ ]*::[^ ]*' "$OUT/pytest_gpu.log" | tail -n 1)"
    if [[ $status -eq 124 || $status -eq 137 ]]; then
        detail="last test started: $last_started"
    elif grep -q 'Fatal Python error' "$OUT/pytest_gpu.log" && ! grep -qE '^=+ .* in [0-9.]+s' "$OUT/pytest_gpu.log"; then
        detail="the interpreter crashed in: $last_started"
    else
        detail="$(tail -n 1 "$OUT/pytest_gpu.log" | sed -E 's/^[= ]+//; s/[= ]+$//' | cut -c 1-100)"
    fi
    record "pytest -m gpu" "$status" "$start" "$PYTEST_LIMIT_S" "$detail"
    cap_log "$OUT/pytest_gpu.log"
    cap_log "$OUT/pytest_gpu.xml"

    BENCH=(--device cuda --preset "resnet18,vit_b16" --dtype "fp32,bf16" --e2e --profile)
elif [[ $MODE == cpu ]]; then
    echo "no CUDA GPU visible: build skipped" > "$OUT/build.log"
    echo "no CUDA GPU visible: pytest -m gpu skipped" > "$OUT/pytest_gpu.log"
    record "build" skipped "" "" "no GPU"
    record "pytest -m gpu" skipped "" "" "no GPU"
    BENCH=(--device cpu --preset resnet18 --quick --e2e)
    BENCH_LIMIT_S=$CPU_BENCH_LIMIT_S
fi

# ----------------------------------------------------------------------------- bench
if [[ $MODE == none ]]; then
    record "build, tests, fsam-bench" skipped "" "" "the detection failed"
else
    start=$SECONDS
    run_bounded "$BENCH_LIMIT_S" "$BENCH_STDOUT" "$OUT/bench.log" \
        "$PYTHON" -m benchmarks "${BENCH[@]}" --json "$OUT/results.json" --png "$OUT/results.png"
    record "fsam-bench ${BENCH[*]:0:2}" $? "$start" "$BENCH_LIMIT_S"
    cap_log "$OUT/bench.log"
fi

# --------------------------------------------------------------------------- outputs
: > "$OUT/summary.txt"
file_count="$(find "$OUT" -type f | wc -l)"
total_bytes="$(find "$OUT" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')"
oversized="$(find "$OUT" -type f -size +"$((OUT_MAX_BYTES >> 20))"M -printf '%f ')"
outputs_detail="$file_count files, $((total_bytes >> 10)) KiB in all"
if ((file_count > OUT_MAX_FILES)) || [[ -n "$oversized" ]] || ((total_bytes > OUT_MAX_TOTAL_BYTES)); then
    record "outputs under OUT" "OVER LIMITS" "" "" "$outputs_detail${oversized:+; over 16 MiB: $oversized}"
else
    record "outputs under OUT" 0 "" "" "$outputs_detail"
fi

{
    echo "gpu_check $(date -u +%FT%TZ), $(sed -n 's/^commit: //p' "$OUT/env.txt"), $PYTHON"
    echo
    if grep -qE '^(FAILED|ERROR) ' "$OUT/pytest_gpu.log" 2> /dev/null; then
        echo "failing GPU tests (the first 30; all in pytest_gpu.log and pytest_gpu.xml):"
        grep -E '^(FAILED|ERROR) ' "$OUT/pytest_gpu.log" | head -n 30
        echo
    fi
    if [[ -s "$BENCH_STDOUT" ]]; then
        cat "$BENCH_STDOUT"
        echo
    fi
    printf '%-34s %-16s %-12s %s\n' "stage" "verdict" "time/limit" "detail"
    cat "$STAGES"
    if ((${#FAILED_STAGES[@]})); then
        failed="$(printf '%s; ' "${FAILED_STAGES[@]}")"
        echo "gpu_check: FAILED: ${failed%; } ($SECONDS s)"
    else
        echo "gpu_check: every stage ok ($SECONDS s)"
    fi
} > "$OUT/summary.txt"
cap_log "$OUT/summary.txt"

echo
echo "gpu_check: files in $OUT: $(find "$OUT" -type f -printf '%P ')"
echo "================================ summary ================================"
cat "$OUT/summary.txt"
((${#FAILED_STAGES[@]} == 0))
