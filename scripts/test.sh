#!/usr/bin/env bash
# The test command: sets up the environment (scripts/setup_env.sh) and runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k quantize.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$("$root/scripts/setup_env.sh" test,eval | tail -n 1)
cd "$root"
"$py" -m pytest tests "$@"
