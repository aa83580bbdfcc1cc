#!/usr/bin/env bash
# Install what tests/test_browser.py needs on a Debian machine: Debian's `chromium` package
# (/usr/bin/chromium). The test drives it over the DevTools protocol from Python, so no Node.js,
# npm package or browser download is involved. Idempotent (a present chromium is left as it is),
# non-interactive, for root or a user with password-less sudo. Called by .ci/run before pytest.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "ci_browser_setup: $(chromium --version 2>/dev/null) already installed"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "ci_browser_setup: installing chromium needs root or password-less sudo" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q --no-install-recommends chromium
echo "ci_browser_setup: installed $(chromium --version 2>/dev/null)"
