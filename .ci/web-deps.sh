#!/usr/bin/env bash
# The browser tests (tests/web) drive Debian's Chromium through its chromedriver; fonts-nanum lets the
# screenshots show Korean. Installed only where we are root and apt exists; elsewhere the tests skip
# with the reason.
set -euo pipefail

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-nanum >/dev/null
  fi
else
  echo "web-deps: not root or no apt-get; tests/web will skip unless chromium and chromedriver exist" >&2
fi
