#!/usr/bin/env bash
# Compile-check the CUDA side on a machine without a GPU (CI on the CPU machines).
#
#   1. nvcc -c of every csrc/cuda/*.cu for sm_80 and sm_90 (-std=c++17 -O3, no fast math), into a
#      temporary directory. These files are torch-free (launcher pattern), so this takes seconds.
#   2. g++ -fsyntax-only of every csrc/cuda/*.cpp (the tensor glue) against the installed torch's
#      headers plus the CUDA include dir. The CPU wheel ships the c10/cuda headers; they only need
#      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE because the CPU build has no generated
#      c10/cuda/impl/cuda_cmake_macros.h. Nothing is linked: a CPU torch has no libc10_cuda.
#
# Exits non-zero on any failure; exits 0 with a SKIP message only when nvcc is not found.
# nvcc is looked up on PATH, then in $CUDA_HOME/bin, then in /usr/local/cuda/bin.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

nvcc=""
if command -v nvcc >/dev/null 2>&1; then
  nvcc=$(command -v nvcc)
elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  nvcc="${CUDA_HOME}/bin/nvcc"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$nvcc" ]]; then
  echo "check_cuda: SKIP: nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin); CUDA code not checked"
  exit 0
fi
echo "check_cuda: nvcc = $nvcc ($("$nvcc" --version | grep -o 'release [0-9.]*' || echo 'unknown version'))"

# The CUDA include dir: ask nvcc where its toolkit is (it may be a wrapper script), else guess.
cuda_include=""
top=$(cd /tmp && "$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1 || true)
for dir in "${top:+$top/targets/x86_64-linux/include}" "${top:+$top/include}" \
           "${CUDA_HOME:+$CUDA_HOME/include}" "$(dirname "$nvcc")/../include" /usr/local/cuda/include; do
  if [[ -n "$dir" && -f "$dir/cuda_runtime_api.h" ]]; then
    cuda_include=$(cd "$dir" && pwd)
    break
  fi
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0

shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
cpp_files=(csrc/cuda/*.cpp)
shopt -u nullglob
if (( ${#cu_files[@]} == 0 )); then
  echo "check_cuda: FAIL: no csrc/cuda/*.cu files found"
  exit 1
fi

for arch in 80 90; do
  for src in "${cu_files[@]}"; do
    obj="$tmp/$(basename "$src" .cu).sm_$arch.o"
    start=$SECONDS
    # The __CUDA_NO_* defines are what torch.utils.cpp_extension adds to every nvcc call.
    if "$nvcc" -c -std=c++17 -O3 -gencode "arch=compute_$arch,code=sm_$arch" \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
        -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
        -Xcompiler -Wall -I"$root/csrc" "$src" -o "$obj"; then
      echo "check_cuda: OK   nvcc sm_$arch $src ($((SECONDS - start)) s)"
    else
      echo "check_cuda: FAIL nvcc sm_$arch $src"
      failures=$((failures + 1))
    fi
  done
done

# Host-compiled glue: syntax check against torch's headers (no link possible without CUDA torch).
if (( ${#cpp_files[@]} > 0 )); then
  python=${PYTHON:-python3}
  if ! torch_includes=$("$python" -c \
      "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))"); then
    echo "check_cuda: FAIL: could not import torch with $python to find its include dirs"
    exit 1
  fi
  if [[ -z "$cuda_include" ]]; then
    echo "check_cuda: FAIL: CUDA include dir (cuda_runtime_api.h) not found next to $nvcc"
    exit 1
  fi
  cxx=${CXX:-g++}
  flags=(-std=c++17 -fsyntax-only -Wall -Wextra -DTORCHKVQ_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
         -I"$root/csrc")
  # -isystem: warnings from torch/CUDA headers are not ours to fix.
  while IFS= read -r inc; do [[ -n "$inc" ]] && flags+=(-isystem "$inc"); done <<< "$torch_includes"
  flags+=(-isystem "$cuda_include")
  for src in "${cpp_files[@]}"; do
    start=$SECONDS
    if "$cxx" "${flags[@]}" "$src"; then
      echo "check_cuda: OK   $cxx -fsyntax-only $src (torch $("$python" -c 'import torch; print(torch.__version__)'), CUDA include $cuda_include, $((SECONDS - start)) s)"
    else
      echo "check_cuda: FAIL $cxx -fsyntax-only $src"
      failures=$((failures + 1))
    fi
  done
fi

if (( failures > 0 )); then
  echo "check_cuda: $failures check(s) failed"
  exit 1
fi
echo "check_cuda: all CUDA checks passed (${#cu_files[@]} .cu x sm_80/sm_90, ${#cpp_files[@]} .cpp syntax)"
