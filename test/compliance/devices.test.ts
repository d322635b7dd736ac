/**
 * Every shipped device passes the compliance suite (src/compliance): the
 * same checks `vfio-user-ts check --device NAME` runs, against real servers
 * on sockets, one vitest case per check so a failure names it.
 */
import { beforeAll, describe, expect, it } from "vitest";
import { DEVICES } from "../../devices/index.ts";
import { CHECKS } from "../../src/compliance/checks.ts";
import { runCompliance, type ComplianceReport } from "../../src/index.ts";
import type { DeviceOptions } from "../../src/index.ts";

/** Each shipped device with the options it is checked with (bigmem and virtio-blk small, to stay fast). */
const SHIPPED: { name: string; options: DeviceOptions }[] = [
  { name: "edu", options: {} },
  { name: "bigmem", options: { size: "1M" } },
  { name: "counter", options: {} },
  // a scratch image (no file=): each device the suite creates gets its own
  { name: "virtio-blk", options: { size: "1M" } },
];

it("every device in the registry is checked here", () => {
  expect(DEVICES.map((d) => d.name).sort()).toEqual(SHIPPED.map((d) => d.name).sort());
});

describe.each(SHIPPED)("$name passes the compliance suite", ({ name, options }) => {
  let report: ComplianceReport;

  beforeAll(async () => {
    const factory = DEVICES.find((d) => d.name === name)!;
    report = await runCompliance(factory, { options });
  }, 60_000);

  it.each(CHECKS.map((c) => c.id))("%s", (id) => {
    const r = report.results.find((x) => x.id === id);
    expect(r, `check ${id} did not run`).toBeDefined();
    expect(r!.problems).toEqual([]);
    expect(r!.passed).toBe(true);
  });
});
