/**
 * Conformance of the command layer (issue 9, part 2, items 4 and 9):
 *
 * - unknown commands (0, 14, 20, 99, 0xffff) get an error reply and the
 *   session goes on (libvfio-user answers them too instead of hanging up; it
 *   uses EINVAL, this server ENOSYS so a client probing a newer command can
 *   tell "no such command" from "bad arguments"); the header is still judged
 *   by its size first;
 * - the argument checks the kernel (vfio_ioctl_device_feature,
 *   vfio_set_irqs_validate_and_prepare) and libvfio-user make: DEVICE_FEATURE
 *   SET with argsz too small for its payload, SET_IRQS count 0 with start != 0
 *   or on an index without vectors, VERSION with a major we do not speak
 *   (error reply, then the connection is closed: spec "closes the connection
 *   if it cannot support the advertised version").
 *
 * Each case opens its own connection, so no case depends on another.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  Command,
  Errno,
  Feature,
  FeatureFlags,
  HeaderFlags,
  IrqIndex,
  IrqSetFlags,
  MigState,
} from "../../protocol/index.ts";
import { BigmemDevice } from "../../devices/bigmem/bigmem.ts";
import { native } from "../../src/transport/native.ts";
import { RawClient, fdTargets, frameBytes, le, memfd, startInProcessServer, type InProcessServer } from "./raw-client.ts";

const TRIGGER_NONE = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER;

const setIrqs = (o: { flags: number; index: number; start?: number; count: number }): Buffer =>
  le().u32(20).u32(o.flags).u32(o.index).u32(o.start ?? 0).u32(o.count).buf;
const feature = (flags: number, data: Uint8Array, argsz: number): Buffer => le().u32(argsz).u32(flags).bytes(data).buf;

let srv: InProcessServer;
beforeAll(() => {
  srv = startInProcessServer();
});
afterAll(() => srv?.stop());

async function connected<T>(fn: (c: RawClient) => Promise<T>): Promise<T> {
  const c = await RawClient.ready(srv.socketPath);
  try {
    return await fn(c);
  } finally {
    c.close();
    await c.waitClosed();
  }
}

describe("unknown commands get an error reply; the session continues", () => {
  for (const command of [0, 14, 20, 99, 0xffff]) {
    it(`command ${command}: ENOSYS, then the device still answers`, () =>
      connected(async (c) => {
        expect(await c.errno(command, Buffer.alloc(8))).toBe(Errno.ENOSYS);
        expect(c.closed).toBe(false);
        expect(await c.vendorId()).toBe(0x1234);
      }));
  }

  it("an unknown command with No_reply gets no reply; the next command is answered", () =>
    connected(async (c) => {
      const id = c.send(20, Buffer.alloc(0), { flags: HeaderFlags.TYPE_COMMAND | HeaderFlags.NO_REPLY });
      expect(await c.vendorId()).toBe(0x1234);
      expect(c.hasReply(id)).toBe(false);
    }));

  it("before VERSION an unknown command is refused like any other (EINVAL), and VERSION still works", async () => {
    const c = RawClient.connect(srv.socketPath);
    expect(await c.errno(99)).toBe(Errno.EINVAL);
    const v = await c.request(Command.VERSION, le().u16(0).u16(0).buf);
    expect(v.header.error).toBe(0);
    expect(await c.vendorId()).toBe(0x1234);
    c.close();
    await c.waitClosed();
  });

  it("the header is judged by its size first: an unknown command above the frame limit closes the connection", async () => {
    const c = await RawClient.ready(srv.socketPath, { capabilities: { max_data_xfer_size: 4096 } });
    c.sendRaw(frameBytes({ msgId: 5, command: 99, size: 16 + 65536 + 1, flags: 0, error: 0 }));
    await c.waitClosed(3000);
    expect(c.hasReply(5)).toBe(false);
  });

  it("an unknown command carrying fds: refused, the fds are closed", () =>
    connected(async (c) => {
      const name = `defects-unknown-${process.pid}`;
      const fd = memfd(name, 4096n);
      expect(await c.errno(99, Buffer.alloc(4), { fds: [fd] })).not.toBe(0);
      native.close(fd);
      expect(await c.vendorId()).toBe(0x1234);
      // our copy is closed: a memfd of that name still open would be the server's
      expect(fdTargets("self").some((t) => t.includes(`memfd:${name} `))).toBe(false);
    }));
});

describe("DEVICE_FEATURE SET with argsz smaller than its payload: EINVAL, nothing changes", () => {
  let big: InProcessServer;
  beforeAll(() => {
    big = startInProcessServer({ device: new BigmemDevice({ size: "64K" }) });
  });
  afterAll(() => big?.stop());

  it("MIG_DEVICE_STATE SET to STOP with argsz 15 (< 8 + 8): EINVAL, the device stays RUNNING", async () => {
    const c = await RawClient.ready(big.socketPath);
    const data = le().u32(MigState.STOP).s32(-1).buf;
    expect(await c.errno(Command.DEVICE_FEATURE, feature(Feature.MIG_DEVICE_STATE | FeatureFlags.SET, data, 15))).toBe(Errno.EINVAL);
    expect(big.server.endpoint.migrationState).toBe(MigState.RUNNING);
    expect(big.server.endpoint.running).toBe(true);
    // the same request with room for its reply works
    expect(await c.errno(Command.DEVICE_FEATURE, feature(Feature.MIG_DEVICE_STATE | FeatureFlags.SET, data, 16))).toBe(0);
    expect(big.server.endpoint.migrationState).toBe(MigState.STOP);
    c.close();
    await c.waitClosed();
  });

  it("DMA_LOGGING_START with argsz 8 (room for nothing): EINVAL, logging stays off", async () => {
    const c = await RawClient.ready(big.socketPath);
    const data = le().u64(4096).u32(1).u32(0).u64(0).u64(0x10000).buf;
    expect(await c.errno(Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_START | FeatureFlags.SET, data, 8))).toBe(Errno.EINVAL);
    expect(big.server.endpoint.dirtyLog).toBeNull();
    c.close();
    await c.waitClosed();
  });

  it("DMA_LOGGING_STOP SET with argsz 7: EINVAL (below the fixed part)", async () => {
    const c = await RawClient.ready(big.socketPath);
    expect(await c.errno(Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_STOP | FeatureFlags.SET, new Uint8Array(0), 7))).toBe(Errno.EINVAL);
    c.close();
    await c.waitClosed();
  });
});

describe("SET_IRQS count 0: only with start 0 and on an index that has vectors", () => {
  it("count 0 with start 1 (DATA_NONE TRIGGER on MSI): EINVAL", () =>
    connected(async (c) => {
      expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_NONE, index: IrqIndex.MSI, start: 1, count: 0 }))).toBe(Errno.EINVAL);
    }));

  it("count 0 on MSI-X of a device without MSI-X (edu): EINVAL", () =>
    connected(async (c) => {
      expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_NONE, index: IrqIndex.MSIX, count: 0 }))).toBe(Errno.EINVAL);
    }));

  it("count 0 on ERR and REQ (no vectors): EINVAL", () =>
    connected(async (c) => {
      for (const index of [IrqIndex.ERR, IrqIndex.REQ]) {
        expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_NONE, index, count: 0 }))).toBe(Errno.EINVAL);
      }
    }));

  it("count 0 with DATA_NONE MASK (only TRIGGER tears an index down): EINVAL", () =>
    connected(async (c) => {
      const flags = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK;
      expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags, index: IrqIndex.INTX, count: 0 }))).toBe(Errno.EINVAL);
    }));

  it("count 0, start 0 on MSI (QEMU's disable): success", () =>
    connected(async (c) => {
      expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_NONE, index: IrqIndex.MSI, count: 0 }))).toBe(0);
    }));
});

describe("VERSION with a major this server does not speak", () => {
  it("major 1: an error reply, then the server closes the connection", async () => {
    const c = RawClient.connect(srv.socketPath);
    const r = await c.request(Command.VERSION, le().u16(1).u16(0).buf);
    expect(r.header.flags & HeaderFlags.ERROR).toBe(HeaderFlags.ERROR);
    expect(r.header.error).toBe(Errno.ENOTSUP);
    await c.waitClosed(3000);
    // the server goes on serving the next client
    const d = await RawClient.ready(srv.socketPath);
    expect(await d.vendorId()).toBe(0x1234);
    d.close();
    await d.waitClosed();
  });
});
