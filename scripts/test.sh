#!/usr/bin/env bash
# Sets up .venv with the test extras, then runs the linters and the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .   # one formatter for the whole tree (style review 8)
python -m pytest Testing -q -p no:cacheprovider "$@"
