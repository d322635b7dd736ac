/**
 * virtio-blk's own latency, without a guest: the `serve --device virtio-blk`
 * CLI in its own process, and this process as the VMM and the guest driver
 * (test/component/virtio-driver.ts: shared memfd RAM, MSI-X eventfds). One
 * request at a time: the time from the notify (a posted REGION_WRITE) to the
 * MSI-X eventfd firing, for 4 KiB reads and writes and a 1 MiB read in 256
 * guest pages. What the server adds to each request in a guest, minus
 * QEMU's share; beside it, a REGION_WRITE + REGION_READ round trip on the
 * same connection (the transport's floor).
 *
 * Run alone:  npx tsx test/bench/virtio-blk-server.ts   (BENCH_OPS=N, default 2000)
 */
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { VfioUserClient, waitEventfd } from "../../src/client/client.ts";
import { BlkFeature, BlkType, Feature } from "../../devices/virtio-blk/virtio-spec.ts";
import { GuestRam, VirtioTestDriver, blkHeader, type Buf } from "../component/virtio-driver.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const OPS = Number(process.env.BENCH_OPS ?? 2000);
const bit = (n: number) => 1n << BigInt(n);
const FEATURES = bit(Feature.VERSION_1) | bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX) | bit(BlkFeature.SEG_MAX) | bit(BlkFeature.BLK_SIZE) | bit(BlkFeature.FLUSH);
const RINGS = 0x100000n;
const BUFS = 0x200000n;
const PAGE_STRIDE = 0x2000n; // guest pages that are not adjacent, as a guest's user buffer's are

async function main(): Promise<void> {
  const dir = mkdtempSync(path.join(tmpdir(), "vfu-vblk-bench-"));
  const image = path.join(dir, "disk.img");
  writeFileSync(image, Buffer.alloc(16 << 20));
  const sock = path.join(dir, "s.sock");
  const server = spawn(process.execPath, [path.join(ROOT, "src/cli/vfio-user-ts.mjs"), "serve", "--device", "virtio-blk", "--socket", sock, "--opt", `file=${image}`, "--log-level", "warn"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  try {
    await new Promise<void>((resolve, reject) => {
      server.stdout!.on("data", (d: Buffer) => String(d).includes("serving") && resolve());
      server.on("exit", (c) => reject(new Error(`server exited (${c})`)));
    });
    const client = await VfioUserClient.connect(sock, { requestTimeoutMs: 10_000 });
    await client.negotiate();
    const ram = new GuestRam(0x100000n, [{ size: 16n << 20n, fd: true }]);
    await ram.mapInto(client);
    await client.enableDevice({ memory: true, busMaster: true });
    const drv = new VirtioTestDriver(client, ram, RINGS, BUFS);
    const fds = await drv.enableMsix(2);
    await drv.init({ accept: FEATURES, configVector: 0, vectors: [1] });

    let used = 0;
    const one = async (bufs: Buf[], placeAt?: bigint[]): Promise<number> => {
      drv.allocAt(BUFS + 0x400000n);
      drv.add(0, bufs, { indirect: true, placeAt });
      drv.setUsedEvent(0, used);
      const t0 = performance.now();
      await drv.kick(0, { posted: true });
      await waitEventfd(fds[1]!, 10_000);
      const dt = performance.now() - t0;
      await drv.waitUsed(0, 1);
      used++;
      drv.recycle(0);
      return dt;
    };
    const stats = (xs: number[]) => {
      const s = [...xs].sort((a, b) => a - b);
      return `median ${(s[s.length >> 1]! * 1000).toFixed(0)} µs, p90 ${(s[Math.floor(s.length * 0.9)]! * 1000).toFixed(0)} µs`;
    };
    const rows: [string, string][] = [];
    const floor: number[] = [];
    for (let i = 0; i < OPS; i++) {
      const t0 = performance.now();
      // queue_select (0 again) and num_queues: registers with no side effect
      await client.regionWrite(0, 0x16, Buffer.alloc(2), { posted: true });
      await client.regionRead(0, 0x12, 2);
      floor.push(performance.now() - t0);
    }
    rows.push(["REGION_WRITE (posted) + REGION_READ round trip", stats(floor)]);
    const sector = (i: number) => BigInt((i % 512) * 8);
    const pages = Array.from({ length: 256 }, (_, k) => BUFS + BigInt(k) * PAGE_STRIDE);
    for (const [name, make, place] of [
      ["4 KiB read", (i: number) => [{ out: blkHeader(BlkType.IN, sector(i)) }, { in: 4096 }, { in: 1 }], undefined],
      ["4 KiB write", (i: number) => [{ out: blkHeader(BlkType.OUT, sector(i)) }, { out: Buffer.alloc(4096, i) }, { in: 1 }], undefined],
      [
        "1 MiB read, 256 pages",
        (i: number) => [{ out: blkHeader(BlkType.IN, BigInt((i % 8) * 2048)) }, ...pages.map(() => ({ in: 4096 })), { in: 1 }],
        [BUFS + 0x600000n, ...pages, BUFS + 0x600100n],
      ],
    ] as const) {
      const n = name.startsWith("1 MiB") ? Math.max(50, OPS / 10) : OPS;
      const lat: number[] = [];
      for (let i = 0; i < n; i++) lat.push(await one(make(i) as Buf[], place as bigint[] | undefined));
      rows.push([`${name}, notify -> interrupt`, stats(lat)]);
    }
    console.log(`virtio-blk server latency, one request at a time, ${OPS} requests (server: its own process; client: this one)`);
    for (const [k, v] of rows) console.log(`| ${k.padEnd(48)} | ${v} |`);
    client.close();
    ram.close();
    drv.close();
  } finally {
    server.kill("SIGTERM");
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`virtio-blk-server bench: ${(err as Error).stack ?? err}`);
    process.exit(1);
  },
);
