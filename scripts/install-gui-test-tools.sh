#!/usr/bin/env bash
# Optional system packages for the GUI/browser tests (Debian/Ubuntu, needs root):
#   tests/test_ds9.py::test_show_under_xvfb   saods9 xvfb xpa-tools imagemagick
#   tests/test_report_browser.py              chromium
# Without them those tests SKIP with the reason; `make test` does not install them
# (about 400 MB and root access), CI may run this script first if it can afford it.
set -euo pipefail
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-gui-test-tools: needs root and apt-get; install saods9 xvfb xpa-tools imagemagick chromium by hand" >&2
    exit 1
fi
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends saods9 xvfb xpa-tools imagemagick chromium
