#!/usr/bin/env bash
# The full test run: builds the QEMU root if needed (root only, cached), then
# every vitest suite with QEMU required (vitest.config.ts: light files in
# parallel, then heavy ones one at a time), then prints "N passed, M failed"
# from vitest's JSON report (test/ci/report-line.mjs). That line is the last
# one printed on every way out: a failed setup or typecheck is
# "0 passed, 1 failed", and so is a run that left no report or a garbled one.
# Arguments go to vitest (e.g. a file filter).
set -uo pipefail
cd "$(dirname "$0")/.."
export npm_config_nodedir=${npm_config_nodedir:-/usr}
export VFIO_USER_REQUIRE_QEMU=${VFIO_USER_REQUIRE_QEMU:-1}
REPORT=test-results/vitest.json

line_printed=
finish() {
  # $1: vitest's exit status. The line from the report; the run fails if
  # vitest did or if the line counts a failure vitest's status did not show.
  local status=$1 rl
  line_printed=1
  node test/ci/report-line.mjs --vitest-status="$status" "$REPORT"
  rl=$?
  case $rl in
    0) ;;
    3) [ "$status" != 0 ] || status=1 ;;
    *) echo "report-line failed (status $rl)"; echo "0 passed, 1 failed"; [ "$status" != 0 ] || status=1 ;;
  esac
  exit "$status"
}
fail_setup() {
  echo "$1"
  line_printed=1
  echo "0 passed, 1 failed"
  exit 1
}
# whatever ends the script early (a signal, an unexpected exit) still gets a line
trap 'rc=$?; [ -n "$line_printed" ] || { line_printed=1; echo "run-all: stopped (status $rc) before the tests finished"; echo "0 passed, 1 failed"; }' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# a report left by an earlier run must never be read as this run's
rm -f "$REPORT" test-results/vitest*.json

if [ "$(id -u)" = 0 ]; then
  bash docker/qemu-root.sh setup || fail_setup "QEMU root setup failed"
  sh docker/guest-kit.sh setup || echo "guest kit setup failed: test/e2e/linux-guest.test.ts will fail"
  # The migrating QEMU client (docker/qemu-mig.sh, ~6 min per build the first time, cached):
  # required where its build scripts exist (../shared/qemu-mig); elsewhere its tier says why
  # it skips. Both builds: the fixed one for the tier, the prototype as found for the
  # conformance report (test/e2e/qemu-mig-conformance.test.ts).
  sh docker/qemu-mig.sh setup all
  case $? in
    0) export VFIO_USER_REQUIRE_QEMU_MIG=${VFIO_USER_REQUIRE_QEMU_MIG:-1} ;;
    3) echo "the migrating QEMU cannot be built here: its tier (test/e2e/qemu-mig-*.test.ts) is skipped" ;;
    *) fail_setup "the migrating QEMU failed to build" ;;
  esac
fi
npx tsc -p tsconfig.json --noEmit || fail_setup "typecheck failed"
mkdir -p test-results
npx vitest run --reporter=default --reporter=json --outputFile="$REPORT" "$@"
finish $?
