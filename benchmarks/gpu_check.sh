#!/usr/bin/env bash
# The GPU check: build for this GPU, run the GPU tests, benchmark, on a machine with no network.
#
# Usage: OUT=/path/to/results bash benchmarks/gpu_check.sh [--help]
#
# 1. detects the GPU's compute capability and builds the extension for that arch only
#    (TORCH_CUDA_ARCH_LIST=X.Y pip install --no-build-isolation --no-deps -e .);
# 2. runs `pytest -m gpu`;
# 3. runs fsam-bench on the GPU presets (resnet18, vit_b16; fp32 and bf16) and the
#    end-to-end benchmark (ResNet-18, batch 128);
# 4. writes everything under $OUT (default ./gpu_check_out), 7 files:
#      env.txt  build.log  pytest_gpu.log  bench.log  results.json  results.png  summary.txt
#    and prints summary.txt (the tables) last.
# Each stage has a time limit; together they stop the check within 490 s (8.2 minutes).
# Without a GPU it says so and runs the CPU fallback: no build, no GPU tests, and a quick
# fsam-bench on the CPU.
#
# Environment: OUT (output folder), PYTHON (interpreter; default python, else python3).
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
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
# Stage limits in seconds. The GPU tests compile every Triton kernel variant on first use,
# so they get the most.
BUILD_LIMIT_S=150
PYTEST_LIMIT_S=180
BENCH_LIMIT_S=160
mkdir -p "$OUT"
cd "$REPO" || exit 1
# The source tree is importable even if the editable install below fails.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

status_line() { printf '%-28s %s\n' "$1" "$2" >> "$OUT/summary.txt"; }

# What a stage did, from its exit status (124: it hit its time limit).
verdict() {
    case "$1" in
        0) echo "ok" ;;
        124) echo "TIMED OUT" ;;
        *) echo "FAILED (exit $1)" ;;
    esac
}

ARCH="$("$PYTHON" - <<'EOF' 2>/dev/null
import torch
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}.{minor}")
EOF
)"

{
    echo "date: $(date -u +%FT%TZ)"
    echo "repo: $REPO  commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "python: $PYTHON"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
    echo "gpu arch: ${ARCH:-none}"
    command -v nvidia-smi > /dev/null && nvidia-smi 2>&1
    command -v nvcc > /dev/null && nvcc --version 2>&1 | tail -2
} > "$OUT/env.txt"

: > "$OUT/summary.txt"
if [[ -n "$ARCH" ]]; then
    echo "gpu_check: GPU with compute capability $ARCH; building the extension for sm_${ARCH/./} only"
    export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)"
    timeout "$BUILD_LIMIT_S" "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
        > "$OUT/build.log" 2>&1
    BUILD_STATUS=$?
    if [[ $BUILD_STATUS -ne 0 && $BUILD_STATUS -ne 124 ]]; then
        # An environment without pip (or not writable) can still build in place: PYTHONPATH finds it.
        echo "--- pip install failed (exit $BUILD_STATUS); building in place instead" >> "$OUT/build.log"
        timeout "$BUILD_LIMIT_S" "$PYTHON" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
        BUILD_STATUS=$?
    fi
    status_line "build (arch $ARCH)" "$(verdict $BUILD_STATUS)"

    echo "gpu_check: running pytest -m gpu"
    timeout "$PYTEST_LIMIT_S" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests \
        > "$OUT/pytest_gpu.log" 2>&1
    status_line "pytest -m gpu" "$(verdict $?) ($(tail -1 "$OUT/pytest_gpu.log"))"

    BENCH_ARGS=(--device cuda --preset resnet18,vit_b16 --dtype fp32,bf16 --e2e)
else
    echo "gpu_check: no CUDA GPU visible here; skipping the build and pytest -m gpu, running the CPU fallback"
    echo "no CUDA GPU visible: build skipped" > "$OUT/build.log"
    echo "no CUDA GPU visible: pytest -m gpu skipped" > "$OUT/pytest_gpu.log"
    status_line "build" "skipped (no GPU)"
    status_line "pytest -m gpu" "skipped (no GPU)"
    BENCH_ARGS=(--device cpu --preset resnet18 --quick --e2e)
    BENCH_LIMIT_S=300  # a shared 2-core CPU is far slower than an H100; no 8-minute promise here
fi

echo "gpu_check: running fsam-bench ${BENCH_ARGS[*]}"
BENCH_TABLES="$(mktemp)"
timeout "$BENCH_LIMIT_S" "$PYTHON" -m benchmarks "${BENCH_ARGS[@]}" \
    --json "$OUT/results.json" --png "$OUT/results.png" > "$BENCH_TABLES" 2> "$OUT/bench.log"
BENCH_STATUS=$?
status_line "fsam-bench" "$(verdict $BENCH_STATUS)"
{ echo; cat "$BENCH_TABLES"; } >> "$OUT/summary.txt"
rm -f "$BENCH_TABLES"

echo
echo "gpu_check: files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "================================ summary ================================"
cat "$OUT/summary.txt"
[[ $BENCH_STATUS -eq 0 ]]
