/**
 * The TypeScript client against an in-process VfioUserServer serving edu,
 * over a real UNIX socket in a temp dir (and once over the in-memory pair):
 * the session, region access, DMA both ways (shared memfd and socket DMA
 * served by the client), interrupts through eventfds, error replies, the
 * DEVICE_FEATURE rules, and the migration state machine as the client sees it.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { EDU_ID, EduDevice } from "../../devices/edu/edu.ts";
import {
  Errno,
  Feature,
  FeatureFlags,
  IrqIndex,
  MigState,
  MigrationFlags,
  RegionIndex,
  type MigState as MigStateValue,
} from "../../protocol/constants.ts";
import { VfioUserError } from "../../protocol/errors.ts";
import { decodeFeatureMigState, encodeFeatureMigState } from "../../protocol/messages/device-feature-data.ts";
import { closeFd, createEventfd, readEventfd, VfioUserClient, waitEventfd } from "../../src/client/client.ts";
import { GuestMemory } from "../../src/client/guest-memory.ts";
import { isSupported, isValidRequest, migStateName } from "../../src/migration/fsm.ts";
import type { MigrationOptions } from "../../src/migration/controller.ts";
import { VfioUserServer } from "../../src/server/server.ts";
import { createMemoryPair } from "../../src/transport/in-memory.ts";

const EDU = { ID: 0x00, LIVENESS: 0x04, FACTORIAL: 0x08, STATUS: 0x20, IRQ_STATUS: 0x24, IRQ_RAISE: 0x60, IRQ_ACK: 0x64, DMA_SRC: 0x80, DMA_DST: 0x88, DMA_COUNT: 0x90, DMA_CMD: 0x98 };
const EDU_BUFFER = 0x40000n;
const RAM_IOVA = 0x100000n;
const RAM_SIZE = 64n * 1024n;

let dir: string;
let server: VfioUserServer | null = null;
const clients: VfioUserClient[] = [];
const fds: number[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "vfio-client-"));
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  server?.close();
  server = null;
  for (const fd of fds.splice(0)) closeFd(fd);
  await new Promise((r) => setImmediate(r));
  rmSync(dir, { recursive: true, force: true });
});

async function start(migration?: MigrationOptions): Promise<{ client: VfioUserClient; server: VfioUserServer }> {
  const sock = join(dir, "edu.sock");
  server = new VfioUserServer({ device: new EduDevice(), migration });
  server.listen(sock);
  const client = await VfioUserClient.connect(sock, { requestTimeoutMs: 5000 });
  clients.push(client);
  await client.negotiate();
  return { client, server };
}

async function expectErrno(p: Promise<unknown>, errno: number): Promise<void> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err, `expected errno ${errno}`).toBeInstanceOf(VfioUserError);
  expect((err as VfioUserError).errno).toBe(errno);
}

async function eduDma(c: VfioUserClient, src: bigint, dst: bigint, count: number, toRam: boolean): Promise<void> {
  await c.writeU64(0, EDU.DMA_SRC, src);
  await c.writeU64(0, EDU.DMA_DST, dst);
  await c.writeU64(0, EDU.DMA_COUNT, BigInt(count));
  await c.writeU32(0, EDU.DMA_CMD, toRam ? 0x3 : 0x1);
  for (let i = 0; i < 500; i++) {
    if (((await c.readU32(0, EDU.DMA_CMD)) & 1) === 0) return;
    await new Promise((r) => setTimeout(r, 2));
  }
  throw new Error("edu DMA did not finish");
}

describe("session and device description", () => {
  it("negotiates like QEMU and reads the device, region and IRQ info", async () => {
    const { client } = await start();
    const caps = client.serverCapabilities!;
    expect(caps.max_data_xfer_size).toBe(1 << 20);
    expect(caps.max_msg_fds).toBeGreaterThanOrEqual(1);
    expect(caps.migration?.pgsize).toBe(4096n);
    expect(client.maxDataXferSize).toBe(1 << 20);

    const info = await client.deviceInfo();
    expect(info.num_regions).toBe(RegionIndex.NUM_REGIONS);
    expect(info.num_irqs).toBe(IrqIndex.NUM_IRQS);
    expect(info.flags & 0x3).toBe(0x3); // RESET | PCI

    const bar0 = await client.regionInfo(0);
    expect(bar0.size).toBe(1n << 20n);
    expect(bar0.flags & 0x3).toBe(0x3);
    expect((await client.regionInfo(1)).size).toBe(0n);
    expect((await client.regionInfo(RegionIndex.CONFIG)).size).toBe(256n);
    expect((await client.irqInfo(IrqIndex.INTX)).count).toBe(1);
    expect((await client.irqInfo(IrqIndex.MSI)).count).toBe(1);
    expect((await client.irqInfo(IrqIndex.MSIX)).count).toBe(0);
  });

  it("reads and writes edu registers, posted writes included", async () => {
    const { client } = await start();
    expect(await client.readU32(0, EDU.ID)).toBe(EDU_ID);
    await client.writeU32(0, EDU.LIVENESS, 0x12345678);
    expect(await client.readU32(0, EDU.LIVENESS)).toBe(~0x12345678 >>> 0);
    await client.writeU32(0, EDU.LIVENESS, 0xf0f0f0f0, { posted: true });
    expect(await client.readU32(0, EDU.LIVENESS)).toBe(0x0f0f0f0f);
    await client.writeU32(0, EDU.FACTORIAL, 10);
    await new Promise((r) => setTimeout(r, 10));
    expect(await client.readU32(0, EDU.FACTORIAL)).toBe(3628800);
    const vendor = await client.regionRead(RegionIndex.CONFIG, 0, 4);
    expect(vendor.readUInt16LE(0)).toBe(0x1234);
    expect(vendor.readUInt16LE(2)).toBe(0x11e8);
  });

  it("works over the in-memory transport pair, fds included", async () => {
    server = new VfioUserServer({ device: new EduDevice() });
    const [a, b] = createMemoryPair();
    server.accept(b);
    const client = new VfioUserClient(a, { requestTimeoutMs: 5000 });
    clients.push(client);
    await client.negotiate();
    expect(await client.readU32(0, EDU.ID)).toBe(EDU_ID);
    const ram = GuestMemory.create(RAM_SIZE, { iova: RAM_IOVA });
    try {
      await ram.mapInto(client);
      await client.enableDevice({ memory: true, busMaster: true });
      ram.write(0x100, Buffer.from("in-memory pair"));
      await eduDma(client, RAM_IOVA + 0x100n, EDU_BUFFER, 14, false);
      await eduDma(client, EDU_BUFFER, RAM_IOVA + 0x2000n, 14, true);
      expect(ram.read(0x2000, 14).toString()).toBe("in-memory pair");
    } finally {
      ram.close();
    }
  });
});

describe("DMA", () => {
  it("maps a memfd and the edu DMA engine reads and writes it directly", async () => {
    const { client } = await start();
    const ram = GuestMemory.create(RAM_SIZE, { iova: RAM_IOVA });
    try {
      await ram.mapInto(client);
      await client.enableDevice({ memory: true, busMaster: true });
      ram.randomize(0, 4096);
      const pattern = ram.read(0, 4096);
      await eduDma(client, RAM_IOVA, EDU_BUFFER, 4096, false);
      await eduDma(client, EDU_BUFFER, RAM_IOVA + 0x8000n, 4096, true);
      expect(ram.read(0x8000, 4096).equals(pattern)).toBe(true);
      expect(client.socketDma.reads + client.socketDma.writes).toBe(0);
      await client.dmaUnmap(RAM_IOVA, RAM_SIZE);
      await expectErrno(client.dmaUnmap(RAM_IOVA, RAM_SIZE), Errno.ENOENT);
    } finally {
      ram.close();
    }
  });

  it("serves the server's DMA_READ / DMA_WRITE from socket-backed memory", async () => {
    const { client } = await start();
    const backing = Buffer.alloc(Number(RAM_SIZE));
    await client.dmaMap({ iova: RAM_IOVA, size: RAM_SIZE, buffer: backing });
    await client.enableDevice({ memory: true, busMaster: true });
    backing.write("socket dma works", 0x40);
    await eduDma(client, RAM_IOVA + 0x40n, EDU_BUFFER, 16, false);
    await eduDma(client, EDU_BUFFER, RAM_IOVA + 0x1000n, 16, true);
    expect(backing.toString("utf8", 0x1000, 0x1010)).toBe("socket dma works");
    expect(client.socketDma.reads).toBe(1);
    expect(client.socketDma.writes).toBe(1);
    expect(client.socketDma.bytesWritten).toBe(16);
    await client.dmaUnmapAll();
  });

  it("refuses overlapping maps and maps with neither READ nor WRITE", async () => {
    const { client } = await start();
    await client.dmaMap({ iova: RAM_IOVA, size: RAM_SIZE, buffer: Buffer.alloc(Number(RAM_SIZE)) });
    await expectErrno(client.dmaMap({ iova: RAM_IOVA + 0x1000n, size: 0x1000n }), Errno.EEXIST);
    await expectErrno(client.dmaMap({ iova: 0x10_0000_0000n, size: 0x1000n, readable: false, writable: false }), Errno.EINVAL);
  });
});

describe("interrupts", () => {
  it("delivers edu's INTx through an eventfd, automasked until unmasked", async () => {
    const { client } = await start();
    const efd = createEventfd();
    fds.push(efd);
    await client.setIrqEventfds(IrqIndex.INTX, 0, [efd]);
    await client.writeU32(0, EDU.IRQ_RAISE, 0x1);
    expect(await waitEventfd(efd, 2000)).toBe(1n);
    expect(await client.readU32(0, EDU.IRQ_STATUS)).toBe(1);
    await client.writeU32(0, EDU.IRQ_ACK, 0x1);
    // automasked: a second raise is not delivered until the unmask
    await client.writeU32(0, EDU.IRQ_RAISE, 0x2);
    await new Promise((r) => setTimeout(r, 20));
    expect(readEventfd(efd)).toBe(0n);
    await client.unmaskIrq(IrqIndex.INTX);
    expect(await waitEventfd(efd, 2000)).toBe(1n);
    await client.disableIrqs(IrqIndex.INTX);
  });

  it("delivers MSI after the guest enables it in config space", async () => {
    const { client } = await start();
    const efd = createEventfd();
    fds.push(efd);
    expect(await client.enableMsi()).toBe(true);
    await client.setIrqEventfds(IrqIndex.MSI, 0, [efd]);
    await client.writeU32(0, EDU.IRQ_RAISE, 0x4);
    expect(await waitEventfd(efd, 2000)).toBe(1n);
    await client.writeU32(0, EDU.IRQ_ACK, 0x4);
    await client.writeU32(0, EDU.IRQ_RAISE, 0x8);
    expect(await waitEventfd(efd, 2000)).toBe(1n);
  });
});

describe("error replies", () => {
  it("rejects with the server's errno and keeps the connection usable", async () => {
    const { client } = await start();
    await expectErrno(client.regionInfo(9), Errno.EINVAL);
    await expectErrno(client.regionRead(1, 0, 4), Errno.EINVAL);
    await expectErrno(client.regionRead(0, (1n << 20n) - 2n, 4), Errno.EINVAL);
    await expectErrno(client.regionRead(RegionIndex.CONFIG, 0, 0), Errno.EINVAL);
    await expectErrno(client.irqInfo(7), Errno.EINVAL);
    await expectErrno(client.setIrqEventfds(IrqIndex.MSIX, 0, [createEventfdFor()]), Errno.EINVAL);
    await expectErrno(client.migDataRead(4096), Errno.EINVAL); // RUNNING: no data to read
    await expectErrno(client.migDataWrite(Buffer.alloc(8)), Errno.EINVAL); // not RESUMING
    await expectErrno(client.precopyInfo(), Errno.EINVAL);
    await expectErrno(client.dmaLoggingReport(RAM_IOVA, 4096n, 4096n), Errno.EINVAL); // logging not started
    expect(await client.readU32(0, EDU.ID)).toBe(EDU_ID);
  });
});

function createEventfdFor(): number {
  const fd = createEventfd();
  fds.push(fd);
  return fd;
}

describe("DEVICE_FEATURE", () => {
  const F = FeatureFlags;

  it("GET grows argsz by the data; a GET without room carries only argsz", async () => {
    const { client } = await start();
    const r = await client.feature(Feature.MIGRATION | F.GET, new Uint8Array(0), 16);
    expect(r.argsz).toBe(16);
    expect(r.data.length).toBe(8);
    expect(r.data.readBigUInt64LE(0)).toBe(MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY);
    const small = await client.feature(Feature.MIGRATION | F.GET, new Uint8Array(0), 8);
    expect(small.argsz).toBe(16);
    expect(small.data.length).toBe(0);
    expect(await client.migrationFlags()).toBe(MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY);
  });

  it("PROBE echoes the request and changes nothing", async () => {
    const { client } = await start();
    const req = encodeFeatureMigState({ device_state: MigState.STOP, data_fd: 0 });
    const r = await client.feature(Feature.MIG_DEVICE_STATE | F.SET | F.PROBE, req);
    expect(r.flags).toBe(Feature.MIG_DEVICE_STATE | F.SET | F.PROBE);
    expect(Buffer.from(r.data).equals(req)).toBe(true);
    expect(await client.getMigState()).toBe(MigState.RUNNING);
    // PROBE with neither GET nor SET, as QEMU asks about DMA logging
    expect(await client.probeFeature(Feature.DMA_LOGGING_START)).toBe(true);
    expect(await client.probeFeature(Feature.DMA_LOGGING_START, F.SET)).toBe(true);
    expect(await client.probeFeature(Feature.DMA_LOGGING_START, F.GET)).toBe(false);
    expect(await client.probeFeature(Feature.MIGRATION, F.SET)).toBe(false);
    // a PROBE of DMA_LOGGING_START did not start logging
    await expectErrno(client.dmaLoggingReport(RAM_IOVA, 4096n, 4096n), Errno.EINVAL);
  });

  it("answers ENOTSUP for features it lacks and EINVAL for unsupported operations", async () => {
    const { client } = await start();
    await expectErrno(client.feature(Feature.LOW_POWER_ENTRY | F.SET), Errno.ENOTSUP);
    await expectErrno(client.feature(0x4242 | F.GET, new Uint8Array(0), 64), Errno.ENOTSUP);
    expect(await client.probeFeature(Feature.BUS_MASTER)).toBe(false);
    await expectErrno(client.feature(Feature.MIGRATION | F.SET, Buffer.alloc(8)), Errno.EINVAL);
    await expectErrno(client.feature(Feature.MIG_DEVICE_STATE), Errno.EINVAL); // neither GET nor SET
    await expectErrno(client.setMigState(MigState.ERROR), Errno.EINVAL);
  });

  it("MIG_DEVICE_STATE: the SET reply carries the new state and data_fd -1, though the request sent 0", async () => {
    const { client } = await start();
    const r = await client.feature(Feature.MIG_DEVICE_STATE | F.SET, encodeFeatureMigState({ device_state: MigState.STOP, data_fd: 0 }));
    const s = decodeFeatureMigState(r.data);
    expect(s.device_state).toBe(MigState.STOP);
    expect(s.data_fd).toBe(-1);
    const get = await client.feature(Feature.MIG_DEVICE_STATE | F.GET, new Uint8Array(0), 16);
    expect(get.argsz).toBe(16);
    expect(decodeFeatureMigState(get.data)).toEqual({ device_state: MigState.STOP, data_fd: -1 });
    expect((await client.setMigState(MigState.RUNNING)).dataFd).toBe(-1);
  });

  it("DMA logging: START, writes reported once, STOP", async () => {
    const { client } = await start();
    const ram = GuestMemory.create(RAM_SIZE, { iova: RAM_IOVA });
    try {
      await ram.mapInto(client);
      await client.enableDevice({ memory: true, busMaster: true });
      expect(await client.dmaLoggingStart(4096n, [{ iova: RAM_IOVA, length: RAM_SIZE }])).toBe(4096n);
      await expectErrno(client.dmaLoggingStart(4096n, [{ iova: RAM_IOVA, length: RAM_SIZE }]), Errno.EBUSY);
      await eduDma(client, EDU_BUFFER, RAM_IOVA + 0x3800n, 0x1000, true); // straddles pages 3 and 4
      const bitmap = await client.dmaLoggingReport(RAM_IOVA, RAM_SIZE, 4096n);
      expect(bitmap.length).toBe(8);
      expect(bitmap[0]).toBe(0b0001_1000);
      expect((await client.dmaLoggingReport(RAM_IOVA, RAM_SIZE, 4096n))[0]).toBe(0);
      await client.dmaLoggingStop();
      await expectErrno(client.dmaLoggingReport(RAM_IOVA, RAM_SIZE, 4096n), Errno.EINVAL);
    } finally {
      ram.close();
    }
  });
});

/** The whole stop-copy stream of the device, leaving it RUNNING. */
async function saveStream(client: VfioUserClient): Promise<Buffer> {
  await client.setMigState(MigState.STOP_COPY);
  const parts: Buffer[] = [];
  for (;;) {
    const b = await client.migDataRead(1 << 20);
    if (b.length === 0) break;
    parts.push(Buffer.from(b));
  }
  await client.setMigState(MigState.RUNNING);
  return Buffer.concat(parts);
}

describe("migration states through setMigState", () => {
  const ALL: MigStateValue[] = [MigState.STOP, MigState.RUNNING, MigState.STOP_COPY, MigState.RESUMING, MigState.RUNNING_P2P, MigState.PRE_COPY, MigState.PRE_COPY_P2P];

  for (const p2p of [false, true]) {
    it(`every ordered pair of states reached from RUNNING (p2p ${p2p})`, async () => {
      const { client } = await start({ p2p });
      const features = { p2p, preCopy: true };
      const flags = await client.migrationFlags();
      expect((flags & MigrationFlags.P2P) !== 0n).toBe(p2p);
      const stream = await saveStream(client);
      expect(stream.length).toBeGreaterThan(0);
      const states = ALL.filter((s) => isSupported(s, features));
      let checked = 0;
      for (const from of states) {
        for (const to of states) {
          await client.reset();
          expect(await client.getMigState()).toBe(MigState.RUNNING);
          await client.setMigState(from);
          expect(await client.getMigState(), `enter ${migStateName(from)}`).toBe(from);
          // leaving RESUMING loads the stream: give it a whole one
          if (from === MigState.RESUMING && to !== MigState.RESUMING) await client.migDataWrite(stream);
          if (isValidRequest(from, to, features)) {
            const r = await client.setMigState(to);
            expect(r.deviceState, `${migStateName(from)} -> ${migStateName(to)}`).toBe(to);
            expect(await client.getMigState()).toBe(to);
          } else {
            await expectErrno(client.setMigState(to), Errno.EINVAL);
            expect(await client.getMigState(), `refused ${migStateName(from)} -> ${migStateName(to)} leaves the state`).toBe(from);
          }
          checked++;
        }
      }
      expect(checked).toBe(states.length ** 2);
      // unsupported states are refused from anywhere
      if (!p2p) await expectErrno(client.setMigState(MigState.RUNNING_P2P), Errno.EINVAL);
    });
  }

  it("a failing hop leaves ERROR; only DEVICE_RESET brings RUNNING back", async () => {
    const { client } = await start();
    await client.writeU32(0, EDU.LIVENESS, 1);
    await client.setMigState(MigState.RESUMING);
    await expectErrno(client.migDataWrite(Buffer.from("definitely not a VUDS stream")), Errno.EINVAL);
    await expectErrno(client.setMigState(MigState.STOP), Errno.EINVAL);
    expect(await client.getMigState()).toBe(MigState.ERROR);
    await expectErrno(client.setMigState(MigState.RUNNING), Errno.EINVAL);
    expect(await client.getMigState()).toBe(MigState.ERROR);
    await client.reset();
    expect(await client.getMigState()).toBe(MigState.RUNNING);
    expect(await client.readU32(0, EDU.LIVENESS)).toBe(0); // power-on state
  });

  it("a saved stream restores edu's registers and buffer", async () => {
    const { client } = await start();
    const ram = GuestMemory.create(RAM_SIZE, { iova: RAM_IOVA });
    try {
      await ram.mapInto(client);
      await client.enableDevice({ memory: true, busMaster: true });
      ram.write(0, Buffer.from("kept across a snapshot"));
      await eduDma(client, RAM_IOVA, EDU_BUFFER, 22, false);
      await client.writeU32(0, EDU.LIVENESS, 0xabcd);
      const stream = await saveStream(client);
      await client.reset();
      expect(await client.readU32(0, EDU.LIVENESS)).toBe(0);
      await client.setMigState(MigState.RESUMING);
      await client.migDataWrite(stream);
      await client.setMigState(MigState.RUNNING);
      expect(await client.readU32(0, EDU.LIVENESS)).toBe(~0xabcd >>> 0);
      await eduDma(client, EDU_BUFFER, RAM_IOVA + 0x1000n, 22, true);
      expect(ram.read(0x1000, 22).toString()).toBe("kept across a snapshot");
    } finally {
      ram.close();
    }
  });
});
