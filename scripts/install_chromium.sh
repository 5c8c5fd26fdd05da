#!/usr/bin/env bash
# Install headless Chromium from Debian's packages for tests/cli/test_report_browser.py.
# Idempotent: returns at once when /usr/bin/chromium is already there. Needs root (CI runs as root).
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
test -x /usr/bin/chromium
echo "installed: $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
