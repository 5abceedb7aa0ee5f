#!/usr/bin/env bash
# Debian's Chromium for the UI tests (Playwright, from the lock, drives it via executable_path; no browser download).
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
