/** `describe` for suites that need QEMU (kept apart so qemu.ts needs no vitest). */
import { describe, it } from "vitest";
import { qemuAvailable, qemuMigAvailable } from "./shared-dir.ts";

/**
 * When QEMU is unavailable the suite is skipped with the reason logged,
 * unless `VFIO_USER_REQUIRE_QEMU=1`, in which case it fails with the reason.
 */
export function describeQemu(name: string, fn: () => void): void {
  const avail = qemuAvailable();
  if (avail.ok) {
    describe(name, fn);
    return;
  }
  if (process.env.VFIO_USER_REQUIRE_QEMU === "1") {
    describe(name, () => {
      it("QEMU is available (VFIO_USER_REQUIRE_QEMU=1)", () => {
        throw new Error(`QEMU is required but not available: ${avail.why}`);
      });
    });
    return;
  }
  console.warn(`[e2e] skipping "${name}": QEMU not available: ${avail.why} (set VFIO_USER_REQUIRE_QEMU=1 to make this a failure)`);
  describe.skip(name, fn);
}

/**
 * `describe` for suites that need the migrating QEMU (docker/qemu-mig.sh):
 * skipped with the reason when it is not built, unless
 * `VFIO_USER_REQUIRE_QEMU_MIG=1` (what .ci/run sets where the build scripts
 * exist), in which case the suite fails with the reason.
 */
export function describeQemuMig(name: string, fn: () => void, build: "mig" | "mig-asfound" = "mig"): void {
  const avail = qemuMigAvailable(build);
  if (avail.ok) {
    describe(name, fn);
    return;
  }
  if (process.env.VFIO_USER_REQUIRE_QEMU_MIG === "1") {
    describe(name, () => {
      it(`the migrating QEMU (${build}) is available (VFIO_USER_REQUIRE_QEMU_MIG=1)`, () => {
        throw new Error(`the migrating QEMU is required but not available: ${avail.why}`);
      });
    });
    return;
  }
  console.warn(`[e2e] skipping "${name}": ${avail.why} (set VFIO_USER_REQUIRE_QEMU_MIG=1 to make this a failure)`);
  describe.skip(name, fn);
}
