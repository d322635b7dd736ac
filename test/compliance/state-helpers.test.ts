/**
 * The saved-state helpers of the public API (src/device/state.ts):
 * readState's checks and stateDifference's comparison as a migration
 * destination sees a state (after msgpack).
 */
import { describe, expect, it } from "vitest";
import { normalizeState, readState, stateDifference, statesEqual } from "../../src/index.ts";

describe("readState", () => {
  const state = { a: 1, big: 1n << 40n, small64: 5, flag: true, name: "x", bytes: Uint8Array.of(1, 2, 3), nested: { n: 2 } };

  it("reads typed fields and refuses the rest by name", () => {
    const r = readState("dev", state);
    expect(r.u32("a")).toBe(1);
    expect(r.u64("big")).toBe(1n << 40n);
    expect(r.u64("small64")).toBe(5n);
    expect(r.bool("flag")).toBe(true);
    expect(r.string("name")).toBe("x");
    const b = r.bytes("bytes", 3);
    expect([...b]).toEqual([1, 2, 3]);
    expect(b).not.toBe(state.bytes); // a copy
    const n = r.object("nested");
    expect(n.int("n", 0, 3)).toBe(2);
    n.end();
    r.end();
  });

  it("names the field in every refusal", () => {
    expect(() => readState("dev", [1])).toThrow("dev: state is not an object");
    expect(() => readState("dev", null)).toThrow("dev: state is not an object");
    expect(() => readState("dev", state).u32("name")).toThrow('dev: state field "name" is not a u32');
    expect(() => readState("dev", { a: 2 ** 32 }).u32("a")).toThrow('state field "a" is not a u32');
    expect(() => readState("dev", { a: 6 }).u32("a", 0x3)).toThrow('state field "a" has bits outside 0x3: 0x6');
    expect(() => readState("dev", { a: -1n }).u64("a")).toThrow('state field "a" is not a u64');
    expect(() => readState("dev", { a: 1 }).bool("a")).toThrow('state field "a" is not a boolean');
    expect(() => readState("dev", state).bytes("bytes", 4)).toThrow('state field "bytes" is 3 bytes, expected 4');
    expect(() => readState("dev", {}).u32("gone")).toThrow('dev: state field "gone" is missing');
    expect(() => readState("dev", { nested: { x: 1 } }).object("nested").int("y", 0, 1)).toThrow('dev: nested: state field "y" is missing');
    const r = readState("dev", { a: 1, b: 2, c: 3 });
    r.u32("a");
    expect(() => r.end()).toThrow('dev: unknown state fields "b", "c"');
  });
});

describe("stateDifference", () => {
  it("compares states as they arrive through msgpack", () => {
    expect(stateDifference({ b: Buffer.from([1, 2]) }, { b: Uint8Array.of(1, 2) })).toBeNull();
    expect(statesEqual({ x: [1, { y: 2n }] }, { x: [1, { y: 2n }] })).toBe(true);
    expect(stateDifference({ a: 1n }, { a: 1 })).toBe("a: 1n (bigint) vs 1 (number)");
    expect(stateDifference({ a: { b: [1, 2, 3] } }, { a: { b: [1, 2, 4] } })).toBe("a.b[2]: 3 vs 4");
    expect(stateDifference({ a: 1 }, { a: 1, b: 2 })).toBe("b: (missing) vs 2");
    expect(stateDifference({ m: Uint8Array.of(1, 2, 3) }, { m: Uint8Array.of(1, 9, 3) })).toBe("m: bytes differ first at index 1 (0x2 vs 0x9)");
    expect(stateDifference(5, 6)).toBe("(top): 5 vs 6");
    expect(normalizeState({ n: undefined })).toEqual({ n: undefined });
  });
});
