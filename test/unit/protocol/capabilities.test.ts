import { describe, expect, it } from "vitest";
import {
  Defaults,
  Errno,
  VfioUserError,
  defaultCapabilities,
  parseCapabilities,
  serializeCapabilities,
  type Capabilities,
} from "../../../protocol/index.ts";

function einval(fn: () => unknown): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(VfioUserError);
  expect((caught as VfioUserError).errno).toBe(Errno.EINVAL);
}

describe("parseCapabilities", () => {
  it("applies the spec's defaults when data or the capabilities object is absent", () => {
    const defaults: Capabilities = {
      max_msg_fds: 1,
      max_data_xfer_size: 1048576,
      pgsizes: 4096n,
      max_dma_maps: 65535,
      write_multiple: false,
      unknown: {},
    };
    expect(parseCapabilities("")).toEqual(defaults);
    expect(parseCapabilities("{}")).toEqual(defaults);
    expect(parseCapabilities('{"capabilities":{}}')).toEqual(defaults);
    expect(defaultCapabilities()).toEqual(defaults);
  });

  it("reads what QEMU's client sends", () => {
    const qemu =
      '{"capabilities": {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}, "max_msg_fds": 16, ' +
      '"max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": true}}';
    expect(parseCapabilities(qemu)).toEqual({
      max_msg_fds: 16,
      max_data_xfer_size: 1048576,
      pgsizes: 4096n,
      max_dma_maps: 65535,
      write_multiple: true,
      migration: { pgsize: 4096n, max_bitmap_size: 268435456 },
      unknown: {},
    });
  });

  it("reads twin_socket, with supported defaulting to false", () => {
    expect(parseCapabilities('{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}').twin_socket).toEqual({
      supported: true,
      fd_index: 0,
    });
    expect(parseCapabilities('{"capabilities":{"twin_socket":{}}}').twin_socket).toEqual({ supported: false });
  });

  it("fills migration members QEMU would send when one is missing", () => {
    expect(parseCapabilities('{"capabilities":{"migration":{}}}').migration).toEqual({
      pgsize: BigInt(Defaults.MIGRATION_PGSIZE),
      max_bitmap_size: Defaults.MAX_BITMAP_SIZE,
    });
  });

  it("keeps unknown capability keys without interpreting them, ignores unknown top-level keys", () => {
    const caps = parseCapabilities('{"capabilities":{"future_thing":{"a":[1,2]},"max_msg_fds":2},"other":1}');
    expect(caps.unknown).toEqual({ future_thing: { a: [1, 2] } });
    expect(caps.max_msg_fds).toBe(2);
  });

  it("carries a page-size mask above 2^53 exactly", () => {
    expect(parseCapabilities('{"capabilities":{"pgsizes":18446744073709547520}}').pgsizes).toBe(0xffff_ffff_ffff_f000n);
  });

  it.each([
    ["not JSON", "{capabilities"],
    ["a JSON array", "[]"],
    ["a JSON string", '"x"'],
    ["null", "null"],
    ["capabilities not an object", '{"capabilities":[]}'],
    ["capabilities null", '{"capabilities":null}'],
    ["max_msg_fds a string", '{"capabilities":{"max_msg_fds":"8"}}'],
    ["max_msg_fds negative", '{"capabilities":{"max_msg_fds":-1}}'],
    ["max_msg_fds fractional", '{"capabilities":{"max_msg_fds":1.5}}'],
    ["max_data_xfer_size 0", '{"capabilities":{"max_data_xfer_size":0}}'],
    ["max_data_xfer_size above 2^32-1", '{"capabilities":{"max_data_xfer_size":4294967296}}'],
    ["pgsizes 0", '{"capabilities":{"pgsizes":0}}'],
    ["pgsizes a boolean", '{"capabilities":{"pgsizes":true}}'],
    ["pgsizes beyond 64 bits", '{"capabilities":{"pgsizes":36893488147419103232}}'],
    ["max_dma_maps null", '{"capabilities":{"max_dma_maps":null}}'],
    ["write_multiple a number", '{"capabilities":{"write_multiple":1}}'],
    ["twin_socket a boolean", '{"capabilities":{"twin_socket":true}}'],
    ["twin_socket.supported a string", '{"capabilities":{"twin_socket":{"supported":"yes"}}}'],
    ["twin_socket.fd_index negative", '{"capabilities":{"twin_socket":{"supported":true,"fd_index":-1}}}'],
    ["migration a number", '{"capabilities":{"migration":4096}}'],
    ["migration.pgsize a string", '{"capabilities":{"migration":{"pgsize":"4k"}}}'],
  ])("rejects %s with EINVAL", (_what, json) => {
    einval(() => parseCapabilities(json));
  });
});

describe("serializeCapabilities", () => {
  it("writes only the keys given, in a fixed order, numbers as JSON numbers", () => {
    expect(serializeCapabilities({})).toBe('{"capabilities":{}}');
    expect(
      serializeCapabilities({
        max_msg_fds: 8,
        max_data_xfer_size: 1048576,
        pgsizes: 4096n,
        max_dma_maps: 65535,
        write_multiple: true,
        twin_socket: { supported: true, fd_index: 0 },
        migration: { pgsize: 4096n, max_bitmap_size: 268435456 },
      }),
    ).toBe(
      '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,' +
        '"write_multiple":true,"twin_socket":{"supported":true,"fd_index":0},' +
        '"migration":{"pgsize":4096,"max_bitmap_size":268435456}}}',
    );
  });

  it("round-trips through parseCapabilities, unknown keys included", () => {
    const caps: Capabilities = {
      max_msg_fds: 0xffff_ffff,
      max_data_xfer_size: 1,
      pgsizes: 0xffff_ffff_ffff_f000n,
      max_dma_maps: 0,
      write_multiple: false,
      twin_socket: { supported: false },
      migration: { pgsize: 1n << 63n, max_bitmap_size: 0 },
      unknown: { later: { x: "y" } },
    };
    expect(parseCapabilities(serializeCapabilities(caps))).toEqual(caps);
  });

  it.each<[string, Partial<Capabilities>]>([
    ["max_msg_fds negative", { max_msg_fds: -1 }],
    ["max_data_xfer_size 0", { max_data_xfer_size: 0 }],
    ["pgsizes 0", { pgsizes: 0n }],
    ["pgsizes 2^64", { pgsizes: 1n << 64n }],
    ["unknown shadowing a known key", { unknown: { pgsizes: 1 } }],
  ])("refuses %s", (_what, caps) => {
    expect(() => serializeCapabilities(caps)).toThrow(RangeError);
  });
});
