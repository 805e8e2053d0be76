# Source on the GPU machine: makes `import canvaswatch.*` work from this checkout without
# installing (its image has its own torch; no network), carrying a newer protobuf if given.
set -e
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
mkdir -p /tmp/cwns/canvaswatch
for pair in server:server monitors:monitors client:client v1:proto/canvaswatch/v1; do
  ln -sfn "$PWD/${pair#*:}" "/tmp/cwns/canvaswatch/${pair%%:*}"
done
export PYTHONPATH=/tmp/cwns${PYTHONPATH:+:$PYTHONPATH}
set +e
