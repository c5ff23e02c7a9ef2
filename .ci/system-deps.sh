#!/usr/bin/env bash
# System packages the test suite needs that pip cannot install, each checked by the command it
# provides: installed with apt-get (Debian/Ubuntu) only when that command is missing, so a second run
# does nothing. Run as root, or with sudo when it is there; otherwise it prints what to install and
# exits 0 (the tests that need the command then fail with a message naming this script).
#   chromium: tests/test_report.py renders report.html in a real headless browser.
#   postgresql: tests/test_sweep.py starts a real PostgreSQL server (its initdb and pg_ctl, not on PATH
#     on Debian) for an Optuna study shared by two sweeps; pg_ctlcluster comes with the server package.
set -euo pipefail

# "command package" pairs: add a line per system dependency.
DEPS=(
    "chromium chromium"
    "pg_ctlcluster postgresql"
)

missing=()
for dep in "${DEPS[@]}"; do
    read -r cmd pkg <<<"$dep"
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "system-deps: not root and no sudo; install these packages yourself: ${missing[*]}" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get here; install these packages with your package manager: ${missing[*]}" >&2
    exit 0
fi
echo "system-deps: installing ${missing[*]}" >&2
# Wait for another apt/dpkg (a parallel job installing its own packages) rather than fail on its lock.
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
"${APT[@]}" update -qq
"${APT[@]}" install -y -qq "${missing[@]}" >/dev/null
