#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (torch pinned first, then dpseg),
# then runs `demo` (the offline default job: `dvc repro`, then the network on the bank it
# built: the results table) or `test` (the test suite; it installs Debian's chromium for the
# app's browser test when /usr/bin/chromium is missing).
#   bash scripts/quickstart.sh demo
#   bash scripts/quickstart.sh test [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false
VENV=${DPSEG_VENV:-.venv}
PY=${PYTHON:-python3}

stamp="$VENV/.dpseg-installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: a later resolver step must never swap it (constraints.txt)
  "$VENV/bin/python" -m pip install -q -c constraints.txt torch torchvision
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev,app]"
  touch "$stamp"
fi

what=${1:-demo}
shift || true
case "$what" in
  demo)
    export PATH="$PWD/$VENV/bin:$PATH"  # the stages' `python` is this venv's
    # DVC needs a git repository; a plain copy of the sources gets one with a first commit
    if ! git rev-parse --git-dir >/dev/null 2>&1; then
      git init -q && git add -A && git -c user.name=dpseg -c user.email=dpseg@localhost commit -qm "dpseg sources"
    fi
    start=$(date +%s)
    dvc repro "$@"
    echo
    echo "== dpseg demo: mIoU (%) on the shapes val split, pass I / pass II, beside the uniform-random baseline"
    python -m pipeline.stages table params.yaml
    echo "(dvc repro took $(( $(date +%s) - start )) s; \`dvc metrics show\`, \`dvc plots show\` and out/report/report.md have the rest)"
    echo "pictures: out/report/panels/ (image | ground truth | pass I | pass II); your own images: $VENV/bin/dpseg app" ;;
  test)
    # the app's browser test drives the system's Chromium (Playwright never downloads one)
    if [ ! -x "${DPSEG_CHROMIUM:-/usr/bin/chromium}" ]; then
      sudo=""
      [ "$(id -u)" = 0 ] || sudo="sudo"
      $sudo apt-get update -q && $sudo apt-get install -y -q chromium \
        || echo "could not install chromium (apt-get install chromium): the app's browser test will fail" >&2
    fi
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  lint) "$VENV/bin/ruff" check . && exec "$VENV/bin/ruff" format --check . ;;
  *) echo "usage: bash scripts/quickstart.sh demo|test|lint" >&2; exit 2 ;;
esac
