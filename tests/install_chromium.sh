#!/usr/bin/env bash
# Installs Debian's Chromium for the report's browser test (tests/test_report.py) if it is missing.
# Part of the README's test command; a no-op when /usr/bin/chromium exists. Needs root or sudo and
# the Debian package mirror (no other network).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium
