/** --trace fields: each message decoded with the spec's field names. */
import { describe, expect, it } from "vitest";
import {
  Command,
  DmaMapFlags,
  Feature,
  FeatureFlags,
  MigState,
  encodeDeviceFeatureParts,
  encodeDmaMapRequest,
  encodeFeatureMigState,
  encodeRegionReadRequest,
} from "../../../protocol/index.ts";
import { traceFields } from "../../../src/server/trace.ts";

describe("traceFields", () => {
  it("names region, offset and count of a REGION_READ", () => {
    expect(traceFields(Command.REGION_READ, encodeRegionReadRequest({ offset: 0x10n, region: 2, count: 4 }))).toEqual({ offset: "0x10", region: 2, count: 4 });
  });

  it("names flags, offset, address and size of a DMA_MAP, 64-bit values in hex", () => {
    const body = encodeDmaMapRequest({ argsz: 32, flags: DmaMapFlags.READ | DmaMapFlags.WRITE, offset: 0n, address: 0x1_0000_0000n, size: 1n << 29n });
    expect(traceFields(Command.DMA_MAP, body)).toEqual({ argsz: 32, flags: 3, offset: "0x0", address: "0x100000000", size: "0x20000000" });
  });

  it("names the feature, the operation and the migration state of DEVICE_FEATURE", () => {
    const data = encodeFeatureMigState({ device_state: MigState.STOP_COPY, data_fd: 0 });
    const body = Buffer.concat(encodeDeviceFeatureParts({ argsz: 16, flags: Feature.MIG_DEVICE_STATE | FeatureFlags.SET, data }));
    expect(traceFields(Command.DEVICE_FEATURE, body)).toEqual({ argsz: 16, feature: "MIG_DEVICE_STATE", op: "SET", state: "STOP_COPY", data_fd: 0 });
  });

  it("reports a body that does not decode instead of throwing", () => {
    expect(traceFields(Command.DMA_MAP, Buffer.alloc(3))).toHaveProperty("decodeError");
  });
});
