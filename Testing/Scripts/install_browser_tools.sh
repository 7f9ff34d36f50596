#!/usr/bin/env bash
# What the browser tests (Testing/Python/test_web_client.py) need besides Python packages: Debian's Chromium
# (Playwright drives it; no browser download) and Node.js with npm (the tests build the web client from web/).
# Installs what is missing with apt-get when run as root; otherwise says what to install and fails, loudly:
# the tests fail without them rather than skip.
set -euo pipefail
missing=()
[ -x "${CTSAM3D_CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ERROR: the browser tests need ${missing[*]}, which this script can install only as root on Debian or" \
       "Ubuntu: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} for the browser tests (apt-get)" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
