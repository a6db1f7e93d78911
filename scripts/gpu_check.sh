#!/usr/bin/env bash
# One call on the GPU machine (torch 2.11 + CUDA 13, Python 3.12, no network): build torchkvq with
# its CUDA kernels from source, run the CUDA tests, run the GPU benchmarks (when present), and
# run the CUDA tests again under compute-sanitizer memcheck (when present).
#
#   bash scripts/gpu_check.sh            # logs and JSON results under ${OUT:-out}/
#
# Every step runs even if an earlier one failed (except that nothing runs after a failed build);
# the script exits non-zero if any step failed, and SUMMARY lists each step's status.
# Knobs: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the device's own arch),
# MAX_JOBS (default: nproc), SANITIZE=0 to skip compute-sanitizer, SANITIZE_TIMEOUT (seconds,
# default 300), PYTEST_ARGS (extra pytest args).
set -uo pipefail

cd "$(dirname "$0")/.."
out_dir=${OUT:-out}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
python=${PYTHON:-python3}
summary=()
failed=0

# step NAME CMD...: run CMD with output to the terminal and $out_dir/NAME.log; record its status.
step() {
  local name=$1
  shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$out_dir/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  if [[ $rc -eq 0 ]]; then
    summary+=("ok    $name (${took} s)")
  else
    summary+=("FAIL  $name (rc $rc, ${took} s, see $out_dir/$name.log)")
    failed=1
  fi
  return "$rc"
}

finish() {
  {
    echo "=== SUMMARY"
    printf '%s\n' "${summary[@]}"
  } | tee "$out_dir/summary.txt"
  exit "$failed"
}

find_tool() {  # PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return; fi
  for dir in "${CUDA_HOME:+$CUDA_HOME/bin}" /usr/local/cuda/bin; do
    if [[ -n "$dir" && -x "$dir/$1" ]]; then echo "$dir/$1"; return; fi
  done
}

device_info() {
  nvidia-smi || echo "(nvidia-smi not available)"
  local nvcc
  nvcc=$(find_tool nvcc)
  if [[ -n "$nvcc" ]]; then "$nvcc" --version; else echo "(nvcc not found)"; fi
  "$python" - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
PY
}
step device device_info

# Build for this device's architecture only (much faster than torch's default list).
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  [[ -n "$arch" ]] && export TORCH_CUDA_ARCH_LIST=$arch
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
nvcc=$(find_tool nvcc)
if [[ -z "${CUDA_HOME:-}" && -n "$nvcc" ]]; then
  # Ask nvcc where its toolkit is: `dirname nvcc`/.. is wrong when nvcc is a wrapper script.
  top=$(cd /tmp && "$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
  [[ -n "$top" && -d "$top" ]] && export CUDA_HOME=$(cd "$top" && pwd -P)
fi
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-}"

if ! step build env TORCHKVQ_CUDA=1 "$python" -m pip install --no-build-isolation --no-deps -v -e .; then
  finish
fi
step import "$python" -c "import torchkvq, torch; print('torchkvq', torchkvq.__file__); \
print('cuda kernels:', torchkvq.cuda_available()); assert torchkvq.cuda_available(), 'no CUDA kernels'"

# shellcheck disable=SC2086
step test_cuda "$python" -m pytest -q tests -m cuda -rs ${PYTEST_ARGS:-}

if [[ -f bench/quantize.py ]]; then
  step bench_quantize "$python" bench/quantize.py --device cuda --json "$out_dir/bench_quantize_cuda.json"
else
  summary+=("skip  bench_quantize (bench/quantize.py not found)")
fi

# Last, as it is the slowest: memcheck over the CUDA tests (rc 124: ran past SANITIZE_TIMEOUT).
sanitizer=$(find_tool compute-sanitizer)
if [[ "${SANITIZE:-1}" == "0" ]]; then
  summary+=("skip  memcheck (SANITIZE=0)")
elif [[ -z "$sanitizer" ]]; then
  summary+=("skip  memcheck (compute-sanitizer not found)")
else
  # Without the caching allocator every tensor is its own allocation, so an out-of-bounds access
  # cannot hide inside a larger cached block.
  # shellcheck disable=SC2086
  step memcheck timeout "${SANITIZE_TIMEOUT:-300}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$sanitizer" --tool memcheck \
    --error-exitcode 1 --print-limit 20 "$python" -m pytest -q -x tests -m cuda ${PYTEST_ARGS:-}
fi

finish
