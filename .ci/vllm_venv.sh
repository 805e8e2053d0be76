#!/usr/bin/env bash
# Build, once per machine, the virtual environment with vLLM 0.33.0 that the vLLM plugin's tests run in
# (tests/client/test_vllm_plugin.py). It lives outside the checkout (~9.4 GB: torch 2.14.0's CUDA build
# and vLLM's own dependencies) and takes ~4 min to build, so CI pays that once per machine.
#
#   bash .ci/vllm_venv.sh            # prints the venv's path on its last line; exit 0 when ready
#
# Exit status 3 (and a line starting "SKIP:") when it cannot be built here: not enough free disk.
# Override the place with CANVASWATCH_VLLM_VENV. The venv holds vLLM only; the tests install the
# canvaswatch client (a wheel, no dependencies) into it on every run, so it never goes stale.
set -euo pipefail

VLLM_VERSION=0.33.0
VENV=${CANVASWATCH_VLLM_VENV:-$HOME/.cache/canvaswatch/vllm-$VLLM_VERSION-venv}
MARKER="$VENV/.canvaswatch-complete"
# 9.4 GB installed, plus pip's unpacking of the largest wheels; below this, building would fill the disk.
NEED_KB=$((14 * 1024 * 1024))

if [ -f "$MARKER" ] && [ -x "$VENV/bin/python" ]; then
  echo "$VENV"
  exit 0
fi

parent=$(dirname "$VENV")
mkdir -p "$parent"
# one build at a time per machine (two CI runs at once wait for each other, then reuse it)
exec 9>"$parent/.vllm-$VLLM_VERSION.lock"
flock 9
if [ -f "$MARKER" ] && [ -x "$VENV/bin/python" ]; then
  echo "$VENV"
  exit 0
fi
rm -rf "$VENV"  # a half-built venv (no marker) from an interrupted run
avail_kb=$(df --output=avail -k "$parent" | tail -1 | tr -d ' ')
if [ "$avail_kb" -lt "$NEED_KB" ]; then
  echo "SKIP: vLLM $VLLM_VERSION venv needs ~14 GB free at $parent, only $((avail_kb / 1024 / 1024)) GB there" >&2
  exit 3
fi

echo "building the vLLM $VLLM_VERSION venv at $VENV (~4 min, ~9.4 GB)" >&2
start=$(date +%s)
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
# --no-cache-dir: the wheels would otherwise be kept twice (pip's cache and the venv), ~7 GB more.
# The constraints are vLLM's own pins (and the transformers release pip picks today), so a rebuild
# gets the same torch and transformers. The grep drops one warning per package about this machine's
# local indexes, which do not hold most of them.
if ! "$VENV/bin/pip" install -q --no-cache-dir -c "$(dirname "$0")/vllm-$VLLM_VERSION-constraints.txt" \
    "vllm==$VLLM_VERSION" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2; then
  echo "pip install vllm==$VLLM_VERSION failed; the half-built venv is rebuilt on the next run" >&2
  exit 1
fi
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >&2
touch "$MARKER"
echo "vLLM venv built in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)" >&2
echo "$VENV"
