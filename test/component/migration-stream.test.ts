/**
 * The MIG_DATA_READ stream while the guest keeps writing device memory:
 * records are zero-copy views of device memory, so these check that what
 * goes out is always what its CRC covers and that the destination ends with
 * the source's memory — with BAR writes between reads in PRE_COPY (the
 * device runs) and in STOP_COPY (vfio.h leaves restricting access to the
 * user; the server keeps the stream valid instead).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { BigmemDevice } from "../../devices/bigmem/bigmem.ts";
import { MigState, RegionIndex } from "../../protocol/constants.ts";
import { VfioUserClient } from "../../src/client/client.ts";
import { RecordKind, StateStreamReader, StateStreamWriter } from "../../src/migration/state-stream.ts";
import { VfioUserServer } from "../../src/server/server.ts";

const SIZE = 1 << 20;
const CHUNK = 64 * 1024 + 123; // not a multiple of a page: records end mid-reply
const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

async function setup(): Promise<VfioUserClient> {
  const dir = mkdtempSync(join(tmpdir(), "vfu-stream-"));
  const server = new VfioUserServer({ device: new BigmemDevice({ size: String(SIZE) }) });
  server.listen(join(dir, "s.sock"));
  const c = await VfioUserClient.connect(join(dir, "s.sock"));
  cleanups.push(() => {
    c.close();
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  await c.negotiate();
  const pattern = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i++) pattern[i] = (i * 7 + (i >> 12)) & 0xff;
  await c.regionWrite(RegionIndex.BAR2, 0n, pattern);
  return c;
}

/** Reads the stream to its end, calling `between` after each read; returns the device-memory image it carries. */
async function migrate(c: VfioUserClient, between: (phase: "pre" | "stop", n: number) => Promise<void>): Promise<Buffer> {
  const image = Buffer.alloc(SIZE);
  const reader = new StateStreamReader({ onRecord: (r) => void (r.kind === RecordKind.MEMORY && image.set(r.bytes, Number(r.offset))) });
  await c.setMigState(MigState.PRE_COPY);
  for (let n = 0; ; n++) {
    const d = await c.migDataRead(CHUNK);
    reader.push(d);
    if (d.length < CHUNK) break;
    await between("pre", n);
  }
  await c.setMigState(MigState.STOP_COPY);
  for (let n = 0; ; n++) {
    const d = await c.migDataRead(CHUNK);
    reader.push(d);
    if (d.length === 0) break;
    if (!reader.ended) await between("stop", n); // after END, writes are not migrated (documented)
  }
  reader.finish(); // throws on any CRC mismatch or truncation
  return image;
}

const poke = (c: VfioUserClient, at: number) => c.regionWrite(RegionIndex.BAR2, BigInt(at), Buffer.from([0xde, 0xad, 0xbe, 0xef]));

describe("MIG_DATA_READ under concurrent BAR writes", () => {
  it("writes between pre-copy reads: the stream is valid and carries the final memory", async () => {
    const c = await setup();
    // each write lands just ahead of and just behind the read position
    const image = await migrate(c, async (phase, n) => {
      if (phase === "pre") {
        await poke(c, ((n + 1) * CHUNK + 10) % (SIZE - 4));
        await poke(c, Math.max(0, n * CHUNK - 10) % (SIZE - 4));
      }
    });
    expect(image.equals(await c.regionRead(RegionIndex.BAR2, 0n, SIZE))).toBe(true);
  });

  it("writes between stop-copy reads: the stream stays valid and carries memory as it was at END", async () => {
    const c = await setup();
    const image = await migrate(c, async (phase, n) => {
      if (phase === "stop") await poke(c, (n * 4099) % (SIZE - 4));
    });
    expect(image.equals(await c.regionRead(RegionIndex.BAR2, 0n, SIZE))).toBe(true);
  });
});

describe("StateStreamWriter transient records", () => {
  it("settle() copies the unread rest of a transient view, so later changes do not reach the stream", () => {
    const w = new StateStreamWriter();
    w.header({ deviceType: "t", deviceVersion: 1 });
    const mem = new Uint8Array(8192).fill(0x11);
    w.memory(0n, mem, { transient: true });
    w.end();
    const first = Buffer.concat(w.readSegments(100));
    w.settle();
    mem.fill(0x22); // the "device" writes after the read returned
    const rest = Buffer.concat(w.readSegments(1 << 20));
    const reader = new StateStreamReader();
    reader.push(Buffer.concat([first, rest]));
    const s = reader.finish();
    expect(s.memory[0]!.bytes.every((b) => b === 0x11)).toBe(true);
  });

  it("without settle() a changed view is caught by the CRC", () => {
    const w = new StateStreamWriter();
    w.header({ deviceType: "t", deviceVersion: 1 });
    const mem = new Uint8Array(8192).fill(0x11);
    w.memory(0n, mem, { transient: true });
    w.end();
    const first = Buffer.concat(w.readSegments(100));
    mem.fill(0x22);
    const reader = new StateStreamReader();
    expect(() => {
      reader.push(Buffer.concat([first, ...w.readSegments(1 << 20)]));
      reader.finish();
    }).toThrow(/CRC/i);
  });
});
