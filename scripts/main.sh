#!/usr/bin/env bash
# The main job: sets up the environment with the evaluation extra (scripts/setup_env.sh) and runs
# `torchkvq eval` on the bundled model and text. Arguments go to `torchkvq eval`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$("$root/scripts/setup_env.sh" eval | tail -n 1)
"$py" -m torchkvq eval "$@"
