#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0 -e '.[dev]'
# The browser test drives Debian's Chromium (Playwright's own browser download is never used);
# without it that test skips.
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } \
  || echo "chromium could not be installed: the browser test will skip" >&2
python3 -m ruff check .
python3 -m pytest "$@"
