#!/usr/bin/env bash
# Install (if needed) and run the test suite: all of it by default, slow end-to-end tests included (CI does
# this). Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the developer's loop, and paths or -k
# narrow it further.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The HTML report test renders in headless Chromium when it can be had (Debian, as root); it checks the HTML
# structure alone otherwise, so a failed install is not fatal.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "note: chromium could not be installed; the report render test will skip"
fi
# No "tests" here: pytest's testpaths (pyproject.toml) is the whole suite when no path is given, and a path given
# (`bash scripts/test.sh tests/data`) then narrows it instead of being run on top of everything.
exec .venv/bin/python -m pytest "$@"
