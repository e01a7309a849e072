#!/usr/bin/env bash
# Installs everything the test suite needs and runs the whole suite.
# Usage: bash test.sh [trial arguments, default: tests]
set -uo pipefail
cd "$(dirname "$0")"
# The Redis store's contract tests run against a real redis-server; the web
# pages are tested in headless Chromium (tests/browser.py) through chromedriver.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
# DKIM signatures are checked with Debian's independent verifier, Mail::DKIM.
perl -MMail::DKIM::Verifier -e 1 >/dev/null 2>&1 || missing+=(libmail-dkim-perl)
# Node.js peers (tests/js/package.json): axe-core and the smpp package's SMSC.
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >/dev/null || {
            echo "test.sh: could not install ${missing[*]}" >&2; exit 1; }
    else
        echo "test.sh: these are needed: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
(cd tests/js && npm ci --silent --no-audit --no-fund) || {
    echo "test.sh: npm could not install tests/js/package-lock.json" >&2; exit 1; }
# setuptools' default (PEP 660) editable mode: the checkout stays off sys.path
# and the end-to-end tests start the installed twistd.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    -e '.[test]' || exit 1
log=$(mktemp)
python3 -m twisted.trial --temp-directory="$(mktemp -d)/_trial_temp" "${@:-tests}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# Trial's own summary is "PASSED (successes=N)" / "FAILED (failures=F, errors=E, ...)";
# repeat it in the plain "N passed, N failed" form too.
summary=$(grep -E '^(PASSED|FAILED) \(' "$log" | tail -n 1)
count() { echo "$summary" | grep -oE "$1=[0-9]+" | awk -F= '{n += $2} END {print n + 0}'; }
passed=$(count 'successes'); failed=$(count '(failures|errors|unexpectedSuccesses)')
echo "${passed:-0} passed, ${failed:-0} failed"
rm -f "$log"
exit "$status"
