/**
 * BAR offsets reach device handlers as Numbers (RegionHandlers), so a BAR
 * larger than 2^53 would lose the low bits of offsets above 2^53 (issue 9,
 * part 2, item 11). The framework refuses such a BAR when the device is
 * attached, with a message that says why; 2^53 itself is fine and its last
 * byte arrives at the exact offset.
 */
import { describe, expect, it } from "vitest";
import { silentLogger } from "../../../src/log.ts";
import { Endpoint } from "../../../src/server/endpoint.ts";
import type { BarDefinition, Device } from "../../../src/device/api.ts";

function deviceWithBar(size: bigint, seen: number[]): Device {
  const bar: BarDefinition = {
    index: 0,
    size,
    kind: "mem64",
    read: (offset, data) => {
      seen.push(offset);
      data.fill(0);
    },
    write: (offset) => {
      seen.push(offset);
    },
  };
  return {
    type: "bigbar",
    stateVersion: 1,
    identity: { vendorId: 0x1234, deviceId: 0x4242, classCode: 0xff0000 },
    bars: [bar],
    attach() {},
    reset() {},
    saveState: () => ({}),
    loadState() {},
  };
}

const attach = (device: Device) => new Endpoint(device, { log: silentLogger(), maxDmaMaps: 16, closeFd: () => {} });

describe("BAR sizes are capped at 2^53 so handler offsets stay exact", () => {
  it("a 2^54-byte mem64 BAR is refused at attach with a clear error", () => {
    expect(() => attach(deviceWithBar(1n << 54n, []))).toThrow(/BAR 0 .*2\^53/);
  });

  it("a 2^53-byte BAR is accepted; an access at its last byte reaches the handler at that exact offset", () => {
    const seen: number[] = [];
    const ep = attach(deviceWithBar(1n << 53n, seen));
    ep.regionRead(0, (1n << 53n) - 1n, 1);
    ep.regionWrite(0, (1n << 53n) - 8n, Buffer.alloc(8));
    expect(seen).toEqual([2 ** 53 - 1, 2 ** 53 - 8]);
  });
});
