#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine: installs what it needs, then runs pytest
# twice: as the machine is (on a CPU that can run scriven's native kernels they must run:
# SCRIVEN_REQUIRE_NATIVE=1 fails the tests that need them instead of skipping; the generation
# kernels' AVX2 build is tested on any CPU with AVX2), and again on the plain PyTorch path that
# machines without the kernels take (SCRIVEN_NATIVE=0).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0 -e '.[dev]'
# The browser test drives Debian's Chromium (Playwright's own browser download is never used);
# without it that test skips.
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } \
  || echo "chromium could not be installed: the browser test will skip" >&2
python3 -m ruff check .
capable=$(python3 -c "import os, shutil; from scriven.accel import native
print(int(native.cpu_has('avx512f', 'avx512bw', 'avx512_vnni')
          and shutil.which(os.environ.get('CC', 'cc')) is not None))")
echo "== the suite as this machine runs it (native kernels required: $capable)"
SCRIVEN_REQUIRE_NATIVE=$capable python3 -m pytest "$@"
echo "== the suite on the portable path (SCRIVEN_NATIVE=0)"
SCRIVEN_NATIVE=0 python3 -m pytest -m "not native and not amx and not generation_kernels" "$@"
