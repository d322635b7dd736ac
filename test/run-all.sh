#!/usr/bin/env bash
# The full test run: builds the QEMU root if needed (root only, cached), then
# every vitest suite with QEMU required, then prints "N passed, M failed"
# from vitest's JSON report.
set -uo pipefail
cd "$(dirname "$0")/.."
export npm_config_nodedir=${npm_config_nodedir:-/usr}
export VFIO_USER_REQUIRE_QEMU=${VFIO_USER_REQUIRE_QEMU:-1}
if [ "$(id -u)" = 0 ]; then
  bash docker/qemu-root.sh setup || { echo "QEMU root setup failed"; exit 1; }
  sh docker/guest-kit.sh setup || echo "guest kit setup failed: test/e2e/linux-guest.test.ts will fail"
  # The migrating QEMU client (docker/qemu-mig.sh, ~6 min per build the first time, cached):
  # required where its build scripts exist (../shared/qemu-mig); elsewhere its tier says why
  # it skips. Both builds: the fixed one for the tier, the prototype as found for the
  # conformance report (test/e2e/qemu-mig-conformance.test.ts).
  sh docker/qemu-mig.sh setup all
  case $? in
    0) export VFIO_USER_REQUIRE_QEMU_MIG=${VFIO_USER_REQUIRE_QEMU_MIG:-1} ;;
    3) echo "the migrating QEMU cannot be built here: its tier (test/e2e/qemu-mig-*.test.ts) is skipped" ;;
    *) echo "the migrating QEMU failed to build"; echo "0 passed, 1 failed"; exit 1 ;;
  esac
fi
npx tsc -p tsconfig.json --noEmit || { echo "typecheck failed"; echo "0 passed, 1 failed"; exit 1; }
mkdir -p test-results
npx vitest run --reporter=default --reporter=json --outputFile=test-results/vitest.json "$@"
status=$?
node -e '
  const r = JSON.parse(require("fs").readFileSync("test-results/vitest.json", "utf8"));
  const failed = r.numFailedTests + (r.numFailedTestSuites > 0 && r.numFailedTests === 0 ? r.numFailedTestSuites : 0);
  console.log(`${r.numPassedTests} passed, ${failed} failed` + (r.numPendingTests ? `, ${r.numPendingTests} skipped` : ""));
' || { echo "0 passed, 1 failed"; exit 1; }
exit $status
