#!/usr/bin/env bash
# Build a sanitized copy of torchkvq (ASan + UBSan by default) outside the source tree and run
# the fuzz tests (tests/test_fuzz.py) against it. The in-place extension is left alone.
#
#   bash scripts/sanitize.sh                 # build + run; extra args go to pytest
#   HYPOTHESIS_PROFILE=thorough bash scripts/sanitize.sh
#
# Knobs: PYTHON (default python3), BUILD (default ${TMPDIR:-/tmp}/torchkvq-sanitize),
# TORCHKVQ_SANITIZE (default address,undefined), MAX_JOBS. The run fails on the first sanitizer
# report (ASan errors are fatal; UBSAN_OPTIONS=halt_on_error=1 makes UBSan's fatal too), and the
# log is also scanned for reports. Leak detection is off: the Python interpreter itself does
# not free everything at exit, which is not ours to fix.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
build=${BUILD:-${TMPDIR:-/tmp}/torchkvq-sanitize}
sanitize=${TORCHKVQ_SANITIZE:-address,undefined}
mkdir -p "$build"

echo "=== build (TORCHKVQ_SANITIZE=$sanitize) into $build/lib"
TORCHKVQ_SANITIZE=$sanitize TORCHKVQ_CUDA=0 "$python" setup.py -q build \
  --build-base "$build/obj" --build-lib "$build/lib" >"$build/build.log" 2>&1 ||
  { tail -n 40 "$build/build.log"; exit 1; }
so=$(ls "$build"/lib/torchkvq/_C*.so)
if [[ $sanitize == *address* ]]; then
  # The interpreter is not instrumented, so the ASan runtime must be loaded first.
  libasan=$("${CXX:-g++}" -print-file-name=libasan.so)
  [[ -f $libasan ]] || { echo "libasan.so not found (looked at $libasan)"; exit 1; }
  # libstdc++ too: otherwise ASan's __cxa_throw interceptor finds no real __cxa_throw and the
  # first C++ exception (any TORCH_CHECK that fails) aborts with "CHECK failed".
  libstdcxx=$("${CXX:-g++}" -print-file-name=libstdc++.so.6)
  export LD_PRELOAD="$libasan $libstdcxx"
fi
ldd "$so" | grep -E "asan|ubsan" || true

# Reports also go to files: pytest captures stderr, and an aborting process loses what it held.
rm -f "$build"/asan.* "$build"/ubsan.*
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:print_summary=1:detect_stack_use_after_return=1:log_path=$build/asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:print_summary=1:log_path=$build/ubsan}
export OMP_WAIT_POLICY=PASSIVE
log="$build/fuzz.log"
echo "=== tests/test_fuzz.py under the sanitizers (log: $log)"
set +e
PYTHONPATH="$build/lib:$root/tests" "$python" -c "import torchkvq, sys; assert torchkvq.__file__.startswith('$build'), torchkvq.__file__; print('torchkvq from', torchkvq.__file__)" &&
  PYTHONPATH="$build/lib" "$python" -m pytest -p no:cacheprovider tests/test_fuzz.py "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
reports=$(ls "$build"/asan.* "$build"/ubsan.* 2>/dev/null || true)
if [[ -n $reports ]] || grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$log"; then
  echo "=== sanitizer reports:"
  for f in $reports; do echo "--- $f"; head -n 60 "$f"; done
  exit 1
fi
if [[ $rc -ne 0 ]]; then
  echo "=== no sanitizer report, but pytest failed (exit status $rc; see $log)"
else
  echo "=== no sanitizer report; tests passed"
fi
exit "$rc"
