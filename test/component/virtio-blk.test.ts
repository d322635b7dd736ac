/**
 * virtio-blk against a virtio driver written from the spec (virtio-driver.ts)
 * over a real socket: discovery as Linux's virtio_pci_modern does it,
 * feature negotiation, reset, requests with chained and indirect
 * descriptors through shared (zero-copy) and socket (copied) guest memory,
 * buffers across DMA region edges, EVENT_IDX, MSI-X and INTx, errors, the
 * ioeventfd doorbell, and migration with requests in flight.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { IrqIndex, MigState, RegionIndex } from "../../protocol/constants.ts";
import { closeFd, readEventfd, VfioUserClient, waitEventfd } from "../../src/client/client.ts";
import { VfioUserServer } from "../../src/index.ts";
import { VirtioBlkDevice } from "../../devices/virtio-blk/virtio-blk.ts";
import { BlkConfig, BlkFeature, BlkStatus, BlkType, CommonCfg, Feature, PciCap, Status } from "../../devices/virtio-blk/virtio-spec.ts";
import { GuestRam, VirtioTestDriver, blkHeader } from "./virtio-driver.ts";

const bit = (n: number) => 1n << BigInt(n);
const ALL = bit(Feature.VERSION_1) | bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX) | bit(BlkFeature.SEG_MAX) | bit(BlkFeature.BLK_SIZE) | bit(BlkFeature.FLUSH) | bit(BlkFeature.RO) | bit(BlkFeature.MQ);
const RAM_BASE = 0x100000n;
const RINGS = 0x100000n;
const BUFS = 0x200000n;

const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function tempDir(): string {
  const dir = mkdtempSync(path.join(tmpdir(), "vfu-vblk-"));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A 1 MiB image with a known pattern: byte i is (i * 13 + (i >> 9)) & 0xff. */
function patternImage(dir: string, size = 1 << 20): string {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 13 + (i >> 9)) & 0xff;
  const p = path.join(dir, "disk.img");
  writeFileSync(p, b);
  return p;
}

interface Rig {
  dev: VirtioBlkDevice;
  server: VfioUserServer;
  client: VfioUserClient;
  ram: GuestRam;
  drv: VirtioTestDriver;
  sock: string;
}

async function rig(opts: Record<string, string>, layout: { size: bigint; fd: boolean }[] = [{ size: 4n << 20n, fd: true }], dir = tempDir(), name = "vblk"): Promise<Rig> {
  const dev = new VirtioBlkDevice(opts);
  const server = new VfioUserServer({ device: dev });
  const sock = path.join(dir, `${name}.sock`);
  server.listen(sock);
  const client = await VfioUserClient.connect(sock, { requestTimeoutMs: 5000 });
  await client.negotiate();
  const ram = new GuestRam(RAM_BASE, layout);
  await ram.mapInto(client);
  await client.enableDevice({ memory: true, busMaster: true });
  const drv = new VirtioTestDriver(client, ram, RINGS, BUFS);
  cleanups.push(() => server.close(), () => client.close(), () => ram.close(), () => drv.close());
  return { dev, server, client, ram, drv, sock };
}

/** A read of `sectors` at `sector` in `pieces` data buffers; returns data and status. */
async function readBlocks(drv: VirtioTestDriver, sector: bigint, sectors: number, o: { indirect?: boolean; pieces?: number; q?: number } = {}) {
  const q = o.q ?? 0;
  const pieces = o.pieces ?? 1;
  const each = (sectors * 512) / pieces;
  const sub = drv.add(q, [{ out: blkHeader(BlkType.IN, sector) }, ...Array.from({ length: pieces }, () => ({ in: each })), { in: 1 }], { indirect: o.indirect });
  await drv.kick(q);
  const [used] = await drv.waitUsed(q, 1);
  const data = Buffer.concat(sub.inAddrs.slice(0, -1).map((a) => drv.ram.read(a.addr, a.length)));
  const status = drv.ram.read(sub.inAddrs.at(-1)!.addr, 1)[0];
  return { used: used!, head: sub.head, data, status };
}

async function writeBlocks(drv: VirtioTestDriver, sector: bigint, data: Buffer, o: { indirect?: boolean; pieces?: number; q?: number } = {}) {
  const q = o.q ?? 0;
  const pieces = o.pieces ?? 1;
  const each = data.length / pieces;
  const outs = Array.from({ length: pieces }, (_, i) => ({ out: data.subarray(i * each, (i + 1) * each) }));
  const sub = drv.add(q, [{ out: blkHeader(BlkType.OUT, sector) }, ...outs, { in: 1 }], { indirect: o.indirect });
  await drv.kick(q);
  const [used] = await drv.waitUsed(q, 1);
  return { used: used!, status: drv.ram.read(sub.inAddrs[0]!.addr, 1)[0] };
}

const expected = (from: number, n: number) => Buffer.from(Array.from({ length: n }, (_, k) => ((from + k) * 13 + ((from + k) >> 9)) & 0xff));

describe("virtio-blk: discovery and negotiation (as virtio_pci_modern probes)", () => {
  it("is a modern virtio block device with the five virtio-pci capabilities in BAR0", async () => {
    const { client, drv } = await rig({ size: "1M" });
    const cfg = await client.regionRead(RegionIndex.CONFIG, 0, 64);
    expect(cfg.readUInt16LE(0)).toBe(0x1af4);
    expect(cfg.readUInt16LE(2)).toBe(0x1042);
    expect(cfg[8]).toBeGreaterThanOrEqual(1);
    const caps = await drv.probe();
    expect(caps.all.length).toBe(5);
    expect(caps.common).toBe(0);
    expect(caps.isr).toBe(0x1000);
    expect(caps.device).toBe(0x2000);
    expect(caps.deviceLength).toBe(BlkConfig.SIZEOF);
    expect(caps.notify).toBe(0x3000);
    expect(caps.notifyMultiplier).toBe(4);
    expect(caps.notifyLength).toBe(4);
    expect(caps.pciCfg).toBeGreaterThan(0);
    expect(Number(await drv.common(CommonCfg.NUM_QUEUES, 2))).toBe(1);
    const f = await drv.features();
    for (const b of [Feature.VERSION_1, Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH]) expect(f & bit(b)).toBe(bit(b));
    expect(f & bit(BlkFeature.RO)).toBe(0n);
    expect(await drv.deviceConfig(BlkConfig.CAPACITY, 8)).toBe(2048n);
    expect(await drv.deviceConfig(BlkConfig.BLK_SIZE, 4)).toBe(512n);
    expect(await drv.deviceConfig(BlkConfig.SEG_MAX, 4)).toBe(254n);
  });

  it("keeps FEATURES_OK only for offered features including VERSION_1", async () => {
    const { drv } = await rig({ size: "1M" });
    await drv.probe();
    await drv.reset();
    await drv.setCommon(CommonCfg.DEVICE_STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER);
    expect(await drv.negotiate(bit(BlkFeature.FLUSH))).toBe(false); // no VERSION_1
    expect(await drv.negotiate(bit(Feature.VERSION_1) | bit(BlkFeature.DISCARD))).toBe(false); // not offered
    expect(await drv.negotiate(bit(Feature.VERSION_1) | bit(BlkFeature.FLUSH))).toBe(true);
    // features are fixed once FEATURES_OK is set
    await drv.setCommon(CommonCfg.DRIVER_FEATURE_SELECT, 4, 0);
    await drv.setCommon(CommonCfg.DRIVER_FEATURE, 4, 0);
    expect(await drv.common(CommonCfg.DRIVER_FEATURE, 4)).toBe(bit(BlkFeature.FLUSH));
  });

  it("queue configuration: size powers of two up to the maximum, vectors beyond the table read NO_VECTOR, absent queues read size 0", async () => {
    const { drv } = await rig({ size: "1M", "queue-size": "128" });
    await drv.probe();
    await drv.setCommon(CommonCfg.QUEUE_SELECT, 2, 0);
    expect(await drv.common(CommonCfg.QUEUE_SIZE, 2)).toBe(128n);
    await drv.setCommon(CommonCfg.QUEUE_SIZE, 2, 100);
    expect(await drv.common(CommonCfg.QUEUE_SIZE, 2)).toBe(128n);
    await drv.setCommon(CommonCfg.QUEUE_SIZE, 2, 256);
    expect(await drv.common(CommonCfg.QUEUE_SIZE, 2)).toBe(128n);
    await drv.setCommon(CommonCfg.QUEUE_SIZE, 2, 64);
    expect(await drv.common(CommonCfg.QUEUE_SIZE, 2)).toBe(64n);
    await drv.setCommon(CommonCfg.QUEUE_MSIX_VECTOR, 2, 1);
    expect(await drv.common(CommonCfg.QUEUE_MSIX_VECTOR, 2)).toBe(1n);
    await drv.setCommon(CommonCfg.QUEUE_MSIX_VECTOR, 2, 2); // 2 vectors: config + one queue
    expect(await drv.common(CommonCfg.QUEUE_MSIX_VECTOR, 2)).toBe(0xffffn);
    await drv.setCommon(CommonCfg.QUEUE_DESC, 4, 0x1234_5000); // low half, as Linux writes 64-bit fields
    await drv.setCommon(CommonCfg.QUEUE_DESC + 4, 4, 0x1);
    expect(await drv.common(CommonCfg.QUEUE_DESC, 8)).toBe(0x1_1234_5000n);
    await drv.setCommon(CommonCfg.QUEUE_SELECT, 2, 1);
    expect(await drv.common(CommonCfg.QUEUE_SIZE, 2)).toBe(0n);
  });

  it("PCI configuration access window (VIRTIO_PCI_CAP_PCI_CFG) reads and writes BAR0", async () => {
    const { client, drv } = await rig({ size: "1M" });
    const caps = await drv.probe();
    const at = caps.pciCfg;
    const set32 = (o: number, v: number) => client.writeU32(RegionIndex.CONFIG, at + o, v);
    await client.regionWrite(RegionIndex.CONFIG, at + PciCap.BAR, Uint8Array.of(0));
    await set32(PciCap.OFFSET, CommonCfg.NUM_QUEUES);
    await set32(PciCap.LENGTH, 2);
    expect((await client.regionRead(RegionIndex.CONFIG, at + PciCap.PCI_CFG_DATA, 2)).readUInt16LE(0)).toBe(1);
    await set32(PciCap.OFFSET, CommonCfg.DEVICE_STATUS);
    await set32(PciCap.LENGTH, 1);
    await client.regionWrite(RegionIndex.CONFIG, at + PciCap.PCI_CFG_DATA, Uint8Array.of(Status.ACKNOWLEDGE));
    expect(await drv.status()).toBe(Status.ACKNOWLEDGE);
  });
});

describe("virtio-blk: requests", () => {
  it("reads and writes with chained descriptors, zero-copy from shared memory; the image holds what was written", async () => {
    const dir = tempDir();
    const img = patternImage(dir);
    const { dev, drv } = await rig({ file: img }, undefined, dir);
    await drv.init({ accept: ALL });
    const r = await readBlocks(drv, 3n, 4, { pieces: 2 });
    expect(r.status).toBe(BlkStatus.OK);
    expect(r.used).toEqual({ id: r.head, len: 4 * 512 + 1 });
    expect(r.data.equals(expected(3 * 512, 4 * 512))).toBe(true);
    const data = Buffer.alloc(8192, 0x5a);
    const w = await writeBlocks(drv, 100n, data, { pieces: 4 });
    expect(w.status).toBe(BlkStatus.OK);
    expect(w.used.len).toBe(1);
    const again = await readBlocks(drv, 100n, 16);
    expect(again.data.equals(data)).toBe(true);
    expect(readFileSync(img).subarray(100 * 512, 100 * 512 + 8192).equals(data)).toBe(true);
    expect(dev.stats.zeroCopy).toBe(3);
    expect(dev.stats.copied).toBe(0);
  });

  it("indirect descriptors, and a request whose buffers straddle DMA regions of both kinds (split per region)", async () => {
    const dir = tempDir();
    const img = patternImage(dir);
    // [1 MiB fd][1 MiB socket][2 MiB fd]: rings in the first, buffers placed across the edges
    const { dev, drv, ram } = await rig({ file: img }, [{ size: 2n << 20n, fd: true }, { size: 1n << 20n, fd: false }, { size: 1n << 20n, fd: true }], dir);
    await drv.init({ accept: ALL });
    const [e1, e2] = ram.edges;
    const placeAt = [BUFS, e1! - 700n, e2! - 300n, BUFS + 0x1000n];
    drv.allocAt(BUFS + 0x10000n); // the indirect table goes elsewhere
    const sub = drv.add(0, [{ out: blkHeader(BlkType.IN, 8n) }, { in: 1024 }, { in: 1024 }, { in: 1 }], { indirect: true, placeAt });
    await drv.kick(0);
    const [used] = await drv.waitUsed(0, 1);
    expect(used).toEqual({ id: sub.head, len: 2049 });
    expect(ram.read(placeAt[1]!, 1024).equals(expected(8 * 512, 1024))).toBe(true);
    expect(ram.read(placeAt[2]!, 1024).equals(expected(8 * 512 + 1024, 1024))).toBe(true);
    expect(ram.read(placeAt[3]!, 1)[0]).toBe(BlkStatus.OK);
    // parts in socket memory: copied, not mapped
    expect(dev.stats.copied).toBe(1);
    // all in shared memory again, indirect: zero-copy
    const r = await readBlocks(drv, 0n, 2, { indirect: true });
    expect(r.data.equals(expected(0, 1024))).toBe(true);
    expect(dev.stats.zeroCopy).toBe(1);
    // a write whose data crosses from socket memory into shared memory
    const data = Buffer.alloc(1024, 0xa5);
    const w = drv.add(0, [{ out: blkHeader(BlkType.OUT, 50n) }, { out: data }, { in: 1 }], { placeAt: [BUFS + 0x2000n, e2! - 100n, BUFS + 0x3000n] });
    await drv.kick(0);
    await drv.waitUsed(0, 1);
    expect(ram.read(w.inAddrs[0]!.addr, 1)[0]).toBe(BlkStatus.OK);
    expect(readFileSync(img).subarray(50 * 512, 51 * 512 + 512).equals(data)).toBe(true);
  });

  it("FLUSH, GET_ID, unsupported types, out-of-range and misaligned requests", async () => {
    const { drv, ram } = await rig({ size: "64K", serial: "disk-7" });
    await drv.init({ accept: ALL });
    const one = async (bufs: Parameters<VirtioTestDriver["add"]>[1]) => {
      const s = drv.add(0, bufs);
      await drv.kick(0);
      const [u] = await drv.waitUsed(0, 1);
      return { used: u!, status: ram.read(s.inAddrs.at(-1)!.addr, 1)[0], s };
    };
    expect((await one([{ out: blkHeader(BlkType.FLUSH, 0n) }, { in: 1 }])).status).toBe(BlkStatus.OK);
    const id = await one([{ out: blkHeader(BlkType.GET_ID, 0n) }, { in: 20 }, { in: 1 }]);
    expect(id.status).toBe(BlkStatus.OK);
    expect(id.used.len).toBe(21);
    expect(ram.read(id.s.inAddrs[0]!.addr, 20).toString("latin1")).toBe("disk-7".padEnd(20, "\0"));
    expect((await one([{ out: blkHeader(BlkType.DISCARD, 0n) }, { out: Buffer.alloc(16) }, { in: 1 }])).status).toBe(BlkStatus.UNSUPP);
    expect((await one([{ out: blkHeader(99, 0n) }, { in: 1 }])).status).toBe(BlkStatus.UNSUPP);
    // 64 KiB = 128 sectors: the last one reads, one past it does not
    expect((await one([{ out: blkHeader(BlkType.IN, 127n) }, { in: 512 }, { in: 1 }])).status).toBe(BlkStatus.OK);
    const past = await one([{ out: blkHeader(BlkType.IN, 127n) }, { in: 1024 }, { in: 1 }]);
    expect(past.status).toBe(BlkStatus.IOERR);
    expect(past.used.len).toBe(1);
    expect((await one([{ out: blkHeader(BlkType.IN, 0xffff_ffff_ffff_ffffn) }, { in: 512 }, { in: 1 }])).status).toBe(BlkStatus.IOERR);
    expect((await one([{ out: blkHeader(BlkType.OUT, 0n) }, { out: Buffer.alloc(100) }, { in: 1 }])).status).toBe(BlkStatus.IOERR);
    // a header split over two descriptors is still a header
    const h = blkHeader(BlkType.IN, 1n);
    const split = await one([{ out: h.subarray(0, 5) }, { out: h.subarray(5) }, { in: 512 }, { in: 1 }]);
    expect(split.status).toBe(BlkStatus.OK);
  });

  it("readonly=on: RO offered, writes fail with IOERR and the image is unchanged, reads work", async () => {
    const dir = tempDir();
    const img = patternImage(dir, 64 << 10);
    const { drv } = await rig({ file: img, readonly: "on" }, undefined, dir);
    await drv.init({ accept: ALL });
    expect(drv.deviceFeatures & bit(BlkFeature.RO)).toBe(bit(BlkFeature.RO));
    const w = await writeBlocks(drv, 0n, Buffer.alloc(512, 1));
    expect(w.status).toBe(BlkStatus.IOERR);
    expect(readFileSync(img).subarray(0, 512).equals(expected(0, 512))).toBe(true);
    expect((await readBlocks(drv, 0n, 1)).data.equals(expected(0, 512))).toBe(true);
  });

  it("many requests in flight complete once each, through MSI-X", async () => {
    const dir = tempDir();
    const img = patternImage(dir);
    const { drv } = await rig({ file: img }, undefined, dir);
    const fds = await drv.enableMsix(2);
    await drv.init({ accept: ALL, configVector: 0, vectors: [1] });
    const subs = [];
    for (let i = 0; i < 64; i++) subs.push(drv.add(0, [{ out: blkHeader(BlkType.IN, BigInt(i * 8)) }, { in: 4096 }, { in: 1 }], { indirect: i % 2 === 0 }));
    await drv.kick(0);
    const used = await drv.waitUsed(0, 64);
    expect(used.map((u) => u.id).sort((a, b) => a - b)).toEqual(subs.map((s) => s.head).sort((a, b) => a - b));
    for (const s of subs) expect(drv.ram.read(s.inAddrs[1]!.addr, 1)[0]).toBe(BlkStatus.OK);
    expect(subs.every((s, i) => drv.ram.read(s.inAddrs[0]!.addr, 4096).equals(expected(i * 4096, 4096)))).toBe(true);
    expect(await waitEventfd(fds[1]!, 2000)).toBeGreaterThan(0n);
    expect(readEventfd(fds[0]!)).toBe(0n); // no configuration interrupt
  });

  it("requests completed in one turn of the event loop share one used-ring update and one interrupt", async () => {
    // GET_ID never waits for the disk: all 64 complete while the notify is handled
    const { dev, drv } = await rig({ size: "1M", "event-idx": "off" });
    const fds = await drv.enableMsix(2);
    await drv.init({ accept: ALL, configVector: 0, vectors: [1] });
    for (let i = 0; i < 64; i++) drv.add(0, [{ out: blkHeader(BlkType.GET_ID, 0n) }, { in: 20 }, { in: 1 }]);
    await drv.kick(0);
    expect((await drv.waitUsed(0, 64)).every((u) => u.len === 21)).toBe(true);
    await waitEventfd(fds[1]!, 2000);
    expect(dev.stats.interrupts).toBe(1);
  });

  it("EVENT_IDX: the device publishes avail_event and interrupts only past used_event", async () => {
    const { dev, drv } = await rig({ size: "1M" });
    const fds = await drv.enableMsix(2);
    await drv.init({ accept: ALL, configVector: 0, vectors: [1] });
    drv.setUsedEvent(0, 5); // interrupt when the used index passes 5
    for (let i = 0; i < 3; i++) {
      await readBlocks(drv, 0n, 1);
      expect(drv.availEvent(0)).toBe(i + 1);
    }
    expect(dev.stats.interrupts).toBe(0);
    expect(readEventfd(fds[1]!)).toBe(0n);
    for (let i = 0; i < 3; i++) await readBlocks(drv, 0n, 1); // used index 4, 5, 6: 6 passes 5
    await waitEventfd(fds[1]!, 2000);
    expect(dev.stats.interrupts).toBe(1);
  });

  it("without EVENT_IDX and INDIRECT_DESC, NO_INTERRUPT suppresses interrupts; INTx goes through the ISR", async () => {
    const { drv, dev, client } = await rig({ size: "1M", "event-idx": "off", indirect: "off" });
    const f = await drv.enableIntx();
    await drv.init({ accept: ALL });
    expect(drv.deviceFeatures & (bit(Feature.RING_EVENT_IDX) | bit(Feature.RING_INDIRECT_DESC))).toBe(0n);
    drv.ram.setU16(drv.queues[0]!.avail, 1); // VRING_AVAIL_F_NO_INTERRUPT
    await readBlocks(drv, 0n, 1);
    expect(dev.stats.interrupts).toBe(0);
    drv.ram.setU16(drv.queues[0]!.avail, 0);
    await readBlocks(drv, 1n, 1);
    await waitEventfd(f, 2000);
    expect(await drv.readIsr()).toBe(1);
    expect(await drv.readIsr()).toBe(0); // read clears
    await client.unmaskIrq(IrqIndex.INTX);
    // an indirect descriptor the driver was not allowed: the device needs a reset, config interrupt via INTx
    drv.add(0, [{ out: blkHeader(BlkType.IN, 0n) }, { in: 512 }, { in: 1 }], { indirect: true });
    await drv.kick(0);
    for (let i = 0; i < 200 && ((await drv.status()) & Status.DEVICE_NEEDS_RESET) === 0; i++) await new Promise((r) => setTimeout(r, 5));
    expect((await drv.status()) & Status.DEVICE_NEEDS_RESET).toBe(Status.DEVICE_NEEDS_RESET);
    await waitEventfd(f, 2000);
    expect(await drv.readIsr()).toBe(2);
  });

  it("a broken ring (head out of range) sets DEVICE_NEEDS_RESET; a reset brings the device back", async () => {
    const { drv, ram } = await rig({ size: "1M" });
    await drv.init({ accept: ALL });
    const l = drv.queues[0]!;
    ram.setU16(l.avail + 4n, 999);
    ram.setU16(l.avail + 2n, 1);
    await drv.kick(0);
    for (let i = 0; i < 200 && ((await drv.status()) & Status.DEVICE_NEEDS_RESET) === 0; i++) await new Promise((r) => setTimeout(r, 5));
    expect((await drv.status()) & Status.DEVICE_NEEDS_RESET).toBe(Status.DEVICE_NEEDS_RESET);
    await drv.reset();
    expect(Number(await drv.common(CommonCfg.QUEUE_ENABLE, 2))).toBe(0);
    await drv.init({ accept: ALL });
    expect((await readBlocks(drv, 0n, 1)).status).toBe(BlkStatus.OK);
  });

  it("queues=2: VIRTIO_BLK_F_MQ with num_queues 2, three MSI-X vectors, both queues serve requests", async () => {
    const dir = tempDir();
    const img = patternImage(dir);
    const { drv, dev } = await rig({ file: img, queues: "2" }, undefined, dir);
    const fds = await drv.enableMsix(3);
    await drv.init({ accept: ALL, queues: 2, configVector: 0, vectors: [1, 2] });
    expect(drv.deviceFeatures & bit(BlkFeature.MQ)).toBe(bit(BlkFeature.MQ));
    expect(await drv.deviceConfig(BlkConfig.NUM_QUEUES, 2)).toBe(2n);
    expect(drv.caps.notifyLength).toBe(8);
    const a = await readBlocks(drv, 0n, 1, { q: 0 });
    const b = await readBlocks(drv, 1n, 1, { q: 1 });
    expect(a.data.equals(expected(0, 512))).toBe(true);
    expect(b.data.equals(expected(512, 512))).toBe(true);
    await waitEventfd(fds[2]!, 2000); // queue 1's vector
    expect(dev.stats.requests).toBe(2);
  });

  it("a driver reset (device_status 0) clears the ISR and lowers INTx", async () => {
    const { drv, client, server } = await rig({ size: "1M" });
    await drv.enableIntx();
    await drv.init({ accept: ALL });
    await readBlocks(drv, 0n, 1);
    expect(server.endpoint.pci.config.status & 0x8).toBe(0x8); // INTx asserted, ISR not read yet
    await drv.reset();
    expect(server.endpoint.pci.config.status & 0x8).toBe(0);
    expect(await drv.readIsr()).toBe(0);
    await client.unmaskIrq(IrqIndex.INTX);
  });

  it("the doorbell served as an ioeventfd: a signal on it processes the queue", async () => {
    const { drv, client, server } = await rig({ size: "1M" });
    await drv.init({ accept: ALL });
    const { reply, fds } = await client.regionIoFds(0);
    cleanups.push(() => fds.forEach(closeFd));
    expect(reply.sub_regions).toEqual([expect.objectContaining({ offset: 0x3000n, size: 2n })]);
    const s = drv.add(0, [{ out: blkHeader(BlkType.IN, 0n) }, { in: 512 }, { in: 1 }]);
    const { writeSync } = await import("node:fs");
    writeSync(fds[0]!, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
    const [u] = await drv.waitUsed(0, 1);
    expect(u!.id).toBe(s.head);
    expect(server.endpoint.ioEventFds.rings).toBe(1);
  });
});

describe("virtio-blk: migration", () => {
  it("STOP_COPY waits for requests in flight; the destination (same image, same guest RAM) continues where the source stopped", async () => {
    const dir = tempDir();
    const img = patternImage(dir, 8 << 20);
    const src = await rig({ file: img }, [{ size: 8n << 20n, fd: true }], dir, "src");
    const fds = await src.drv.enableMsix(2);
    await src.drv.init({ accept: ALL, configVector: 0, vectors: [1] });
    // 48 writes of 128 KiB in flight when the source is told to stop
    const N = 48;
    const SIZE = 128 << 10;
    const payload = (i: number) => Buffer.alloc(SIZE, i + 1);
    for (let i = 0; i < N; i++) src.drv.add(0, [{ out: blkHeader(BlkType.OUT, BigInt((i * SIZE) / 512)) }, { out: payload(i) }, { in: 1 }], { indirect: true });
    await src.drv.kick(0, { posted: true });
    const stop = await src.client.setMigState(MigState.STOP_COPY);
    expect(stop.deviceState).toBe(MigState.STOP_COPY);
    // quiesce: every one of them completed and was published before the device stopped
    expect(src.drv.usedIdx(0)).toBe(N);
    expect(src.dev.stats.writes).toBe(N);
    const stream: Buffer[] = [];
    for (let c = await src.client.migDataRead(); c.length > 0; c = await src.client.migDataRead()) stream.push(Buffer.from(c));
    const used = await src.drv.waitUsed(0, N);
    expect(new Set(used.map((u) => u.id)).size).toBe(N);
    // requests the guest adds while the source is stopped are the destination's
    const later = src.drv.add(0, [{ out: blkHeader(BlkType.IN, 0n) }, { in: 4096 }, { in: 1 }]);
    src.drv.setUsedEvent(0, N); // as Linux does: interrupt me once the used index passes N
    await src.drv.kick(0);
    await new Promise((r) => setTimeout(r, 20));
    expect(src.drv.usedIdx(0)).toBe(N);

    // destination: its own server on the same image; QEMU would hand it the same guest RAM
    const dev = new VirtioBlkDevice({ file: img });
    const server = new VfioUserServer({ device: dev });
    const sock = path.join(dir, "dst.sock");
    server.listen(sock);
    const client = await VfioUserClient.connect(sock, { requestTimeoutMs: 5000 });
    cleanups.push(() => server.close(), () => client.close());
    await client.negotiate();
    await src.ram.mapInto(client);
    await client.setMigState(MigState.RESUMING);
    for (const c of stream) await client.migDataWrite(c);
    await client.setMigState(MigState.STOP);
    const dstFds = await new VirtioTestDriver(client, src.ram, RINGS, BUFS).enableMsix(2);
    cleanups.push(() => dstFds.forEach(closeFd));
    await client.setMigState(MigState.RUNNING);
    // the request queued during the stop completes on the destination, once; nothing is done twice
    await src.drv.waitUsed(0, 1);
    expect(src.drv.usedIdx(0)).toBe(N + 1);
    expect(src.ram.read(later.inAddrs[0]!.addr, 4096).equals(payload(0).subarray(0, 4096))).toBe(true);
    expect(dev.stats.requests).toBe(1);
    expect(dev.stats.writes).toBe(0);
    await waitEventfd(dstFds[1]!, 2000);
    const image = readFileSync(img);
    for (let i = 0; i < N; i++) expect(image.subarray(i * SIZE, (i + 1) * SIZE).equals(payload(i))).toBe(true);
    readEventfd(fds[1]!);
  });

  it("a request recorded in flight in the state is run by the destination", async () => {
    const dir = tempDir();
    const img = patternImage(dir);
    const a = await rig({ file: img }, undefined, dir, "a");
    await a.drv.init({ accept: ALL });
    const s = a.drv.add(0, [{ out: blkHeader(BlkType.IN, 2n) }, { in: 512 }, { in: 1 }]);
    // as a source would record it: the ring position past the chain, the chain in flight
    const state = a.dev.saveState() as { transport: { queues: { lastAvail: number }[] }; inflight: number[] };
    state.transport.queues[0]!.lastAvail = 1;
    state.inflight = [0, s.head];
    const b = new VirtioBlkDevice({ file: img });
    const server = new VfioUserServer({ device: b });
    cleanups.push(() => server.close());
    b.loadState(state);
    // attached to the same client-side RAM through a fresh connection
    const sock = path.join(dir, "b.sock");
    server.listen(sock);
    const client = await VfioUserClient.connect(sock, { requestTimeoutMs: 5000 });
    cleanups.push(() => client.close());
    await client.negotiate();
    await a.ram.mapInto(client);
    await client.enableDevice({ memory: true, busMaster: true });
    await client.setMigState(MigState.STOP);
    await client.setMigState(MigState.RUNNING);
    const [u] = await a.drv.waitUsed(0, 1);
    expect(u).toEqual({ id: s.head, len: 513 });
    expect(a.ram.read(s.inAddrs[0]!.addr, 512).equals(expected(1024, 512))).toBe(true);
  });
});
