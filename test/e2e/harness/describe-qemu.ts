/** `describe` for suites that need QEMU (kept apart so qemu.ts needs no vitest). */
import { describe, it } from "vitest";
import { qemuAvailable } from "./shared-dir.ts";

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
