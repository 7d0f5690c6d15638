#!/usr/bin/env bash
# Make (or reuse) the virtual environment of one test pass.
#
#   .ci/venv.sh DIR PYTHON_VERSION DJANGO_SPEC EXTRAS [FALLBACK_DJANGO_SPEC]
#
# The interpreter comes from PATH (pythonX.Y) or pyenv. When it is missing this says so in one
# line and fails under CI=true, where every pass must run. Elsewhere it uses python3 with
# FALLBACK_DJANGO_SPEC when one is given (the main pass), or exits 3 ("skip this pass"). The
# venv is rebuilt when the interpreter, the Django spec, the extras or pyproject.toml change.
set -euo pipefail
dir=$1 want=$2 django=$3 extras=$4 fallback=${5:-}
cd "$(dirname "$0")/.."

find_python() {
  local candidate
  for candidate in "python$want" \
    "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")/versions/$want"*/bin/"python$want"; do
    if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c "import sys, venv; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if ! python=$(find_python); then
  if [ "${CI:-}" = "true" ]; then
    echo "Python $want not found (looked for python$want on PATH and in pyenv); the $dir pass needs it" >&2
    exit 1
  elif [ -n "$fallback" ]; then
    python=$(command -v python3)
    echo "Python $want not found (PATH, pyenv): the $dir pass uses $("$python" -V) and $fallback" >&2
    django=$fallback
  else
    echo "Python $want not found (PATH, pyenv): the $dir pass is skipped" >&2
    exit 3
  fi
fi

key="$("$python" -VV | head -1) | $django | $extras | $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$dir/.installed" ] && [ "$(cat "$dir/.installed")" = "$key" ]; then
  exit 0
fi
echo "setting up $dir: $("$python" -V), $django, [$extras]"
rm -rf "$dir"
"$python" -m venv "$dir"
"$dir/bin/pip" install -q --upgrade pip
"$dir/bin/pip" install -q "$django" -e ".[$extras]"
echo "$key" >"$dir/.installed"
