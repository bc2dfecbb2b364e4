#!/usr/bin/env bash
# The test suite (CPU only; about 9 min on 2 cores). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k biwkv`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
