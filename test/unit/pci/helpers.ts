/** Config-space test helpers shared by the PCI unit tests. */
import { ConfigSpace, type ConfigSpaceSpec } from "../../../src/pci/config-space.ts";

export const BASE_SPEC: ConfigSpaceSpec = {
  vendorId: 0x1234,
  deviceId: 0x11e8,
  subsystemVendorId: 0x1af4,
  subsystemId: 0x1100,
  classCode: 0x00ff_01,
  revision: 0x10,
  bars: [{ index: 0, size: 0x1000n, kind: "mem32" }],
  interruptPin: 1,
};

export function make(spec: Partial<ConfigSpaceSpec> = {}): ConfigSpace {
  return new ConfigSpace({ ...BASE_SPEC, ...spec });
}

export const r8 = (c: ConfigSpace, o: number) => c.read(o, 1)[0]!;
export const r16 = (c: ConfigSpace, o: number) => c.read(o, 2).readUInt16LE(0);
export const r32 = (c: ConfigSpace, o: number) => c.read(o, 4).readUInt32LE(0);

export function w8(c: ConfigSpace, o: number, v: number) {
  return c.write(o, Uint8Array.of(v));
}
export function w16(c: ConfigSpace, o: number, v: number) {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(v);
  return c.write(o, b);
}
export function w32(c: ConfigSpace, o: number, v: number) {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return c.write(o, b);
}
