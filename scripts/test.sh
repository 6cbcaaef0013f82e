#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0 -e '.[dev]'
python3 -m ruff check .
python3 -m pytest "$@"
