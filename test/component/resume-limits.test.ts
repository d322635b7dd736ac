/**
 * What a resuming client can make the server hold (issue 9, defect 6): each
 * record is judged from its header before any payload byte is taken, MEMORY
 * payload goes into device memory as it arrives, and a MEMORY record whose
 * CRC does not match resets the device it already wrote. The server's own
 * accounting (MigrationController.resumeBufferHighWater) says what was held.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { BigmemDevice } from "../../devices/bigmem/bigmem.ts";
import { EduDevice } from "../../devices/edu/edu.ts";
import { Errno, MigState, RegionIndex } from "../../protocol/constants.ts";
import { VfioUserError } from "../../protocol/errors.ts";
import { VfioUserClient } from "../../src/client/client.ts";
import { MAX_STATE_RECORD_LENGTH } from "../../src/migration/controller.ts";
import { RecordKind, StateStreamWriter, recordChecksum } from "../../src/migration/state-stream.ts";
import { VfioUserServer } from "../../src/server/server.ts";
import { LogCapture } from "../e2e/harness/server.ts";

const MiB = 1 << 20;
const PAGE = 4096;
const cleanups: (() => unknown)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

/** Preamble and HEADER record for `type`, as a source of that device writes them. */
function streamStart(server: VfioUserServer): Uint8Array {
  const dev = server.endpoint.device;
  const w = new StateStreamWriter();
  w.header({ deviceType: dev.type, deviceVersion: dev.stateVersion, configSize: server.endpoint.pci.config.size });
  return w.read(1 << 16);
}

/** A record header: kind and declared payload length (nothing of the payload). */
function recordHeader(kind: number, length: number): Uint8Array {
  const b = new Uint8Array(5);
  const v = new DataView(b.buffer);
  v.setUint8(0, kind);
  v.setUint32(1, length, true);
  return b;
}

/** A whole MEMORY record; `corrupt` flips the stored CRC. */
function memoryRecord(offset: number, data: Uint8Array, corrupt = false): Uint8Array {
  const out = new Uint8Array(5 + 8 + data.length + 4);
  const v = new DataView(out.buffer);
  v.setUint8(0, RecordKind.MEMORY);
  v.setUint32(1, 8 + data.length, true);
  v.setBigUint64(5, BigInt(offset), true);
  out.set(data, 13);
  const crc = recordChecksum()(out.subarray(0, 13 + data.length));
  v.setUint32(13 + data.length, (corrupt ? ~crc : crc) >>> 0, true);
  return out;
}

let log: LogCapture;

async function resuming(dev: BigmemDevice | EduDevice): Promise<{ client: VfioUserClient; server: VfioUserServer }> {
  const dir = mkdtempSync(path.join(tmpdir(), "vfu-resume-"));
  log = new LogCapture(10_000, false);
  const server = new VfioUserServer({ device: dev, log: pino({ level: "info", base: undefined }, log) });
  const sock = path.join(dir, "s.sock");
  server.listen(sock);
  const client = await VfioUserClient.connect(sock, { requestTimeoutMs: 5000 });
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }), () => server.close(), () => client.close());
  await client.negotiate();
  await client.setMigState(MigState.STOP);
  await client.setMigState(MigState.RESUMING);
  await client.migDataWrite(streamStart(server));
  return { client, server };
}

/** The request is refused; returns the error and the reason the server logged for it. */
async function refusal(p: Promise<unknown>): Promise<VfioUserError & { reason: string }> {
  const mark = log.length;
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err, "the request was refused").toBeInstanceOf(VfioUserError);
  return Object.assign(err as VfioUserError, { reason: log.raw(mark).join("\n") });
}

const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff || 1);

describe("RESUMING: records judged from their header", () => {
  it("a MEMORY record longer than the device's memory is refused at its header, nothing of it buffered", async () => {
    const { client, server } = await resuming(new BigmemDevice({ size: String(8 * MiB) }));
    const err = await refusal(client.migDataWrite(recordHeader(RecordKind.MEMORY, 8 + 9 * MiB)));
    expect(err.errno).toBe(Errno.EINVAL);
    expect(err.reason).toMatch(/more than the device's 8388608 bytes of memory/);
    expect(server.endpoint.migration.resumeBufferHighWater).toBeLessThan(1024); // the HEADER record only
  });

  it("a MEMORY record for a device without memory (edu) is refused at its header", async () => {
    const { client } = await resuming(new EduDevice());
    const err = await refusal(client.migDataWrite(recordHeader(RecordKind.MEMORY, 8 + PAGE)));
    expect(err.reason).toMatch(/no device memory/);
  });

  it("a STATE record over the fixed cap is refused at its header", async () => {
    const { client, server } = await resuming(new BigmemDevice({ size: String(MiB) }));
    const err = await refusal(client.migDataWrite(recordHeader(RecordKind.STATE, MAX_STATE_RECORD_LENGTH + 1)));
    expect(err.reason).toMatch(/STATE record at offset \d+ declares \d+ bytes, above the limit/);
    expect(server.endpoint.migration.resumeBufferHighWater).toBeLessThan(1024);
  });
});

describe("RESUMING: MEMORY written into device memory as it arrives", () => {
  it("32 MiB of MEMORY records over 8 MiB of memory: the server buffers none of it, memory holds the last write", async () => {
    const { client, server } = await resuming(new BigmemDevice({ size: String(8 * MiB) }));
    const record = 1 * MiB;
    for (let pass = 0; pass < 4; pass++) {
      for (let off = 0; off < 8 * MiB; off += record) await client.migDataWrite(memoryRecord(off, pattern(record, pass + off / record)));
    }
    // arrived in max_data_xfer_size pieces, none kept beyond the HEADER record
    expect(server.endpoint.migration.resumeBufferHighWater).toBeLessThan(1024);
    // the bytes are in device memory already (RESUMING does not serve BARs to the guest, but the device holds them)
    const mem = (server.endpoint.device as BigmemDevice).precopyMemory;
    expect(Buffer.from(mem.readPage(0)).equals(Buffer.from(pattern(record, 3 + 0).subarray(0, PAGE)))).toBe(true);
    expect(Buffer.from(mem.readPage(2047)).equals(Buffer.from(pattern(record, 3 + 7).subarray(record - PAGE)))).toBe(true);
  });

  it("chunked at odd sizes (pages split across writes), a record still lands byte for byte", async () => {
    const { client, server } = await resuming(new BigmemDevice({ size: String(MiB) }));
    const data = pattern(16 * PAGE, 5);
    const rec = memoryRecord(3 * PAGE, data);
    for (let at = 0; at < rec.length; at += 1000) await client.migDataWrite(rec.subarray(at, Math.min(rec.length, at + 1000)));
    const mem = (server.endpoint.device as BigmemDevice).precopyMemory;
    for (let p = 0; p < 16; p++) expect(Buffer.from(mem.readPage(3 + p)).equals(Buffer.from(data.subarray(p * PAGE, (p + 1) * PAGE))), `page ${3 + p}`).toBe(true);
    expect(server.endpoint.migration.resumeBufferHighWater).toBeLessThan(1024);
  });

  it("a MEMORY record at an offset outside device memory is refused when its offset arrives", async () => {
    const { client } = await resuming(new BigmemDevice({ size: String(MiB) }));
    const err = await refusal(client.migDataWrite(memoryRecord(MiB - PAGE, pattern(2 * PAGE, 1))));
    expect(err.reason).toMatch(/does not fit device memory/);
  });

  it("a CRC mismatch after the data was written: the write is refused and the device is back at power-on", async () => {
    const { client, server } = await resuming(new BigmemDevice({ size: String(MiB) }));
    const cfgBefore = Buffer.from(server.endpoint.pci.config.snapshot());
    await client.migDataWrite(memoryRecord(0, pattern(4 * PAGE, 9)));
    const mem = (server.endpoint.device as BigmemDevice).precopyMemory;
    expect(mem.readPage(0)[0]).not.toBe(0); // the good record landed
    const err = await refusal(client.migDataWrite(memoryRecord(8 * PAGE, pattern(4 * PAGE, 11), true)));
    expect(err.reason).toMatch(/CRC mismatch in MEMORY record/);
    for (const p of [0, 3, 8, 11]) expect(mem.readPage(p).every((b) => b === 0), `page ${p} reset`).toBe(true);
    expect(Buffer.from(server.endpoint.pci.config.snapshot()).equals(cfgBefore)).toBe(true);
    // the stream stays refused; the client can only reset (or leave)
    await refusal(client.migDataWrite(memoryRecord(0, pattern(PAGE, 1))));
    await refusal(client.setMigState(MigState.STOP));
    await client.reset();
    expect(await client.getMigState()).toBe(MigState.RUNNING);
    expect((await client.regionRead(RegionIndex.BAR2, 0n, PAGE)).every((b) => b === 0)).toBe(true);
  });
});
