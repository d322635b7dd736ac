/**
 * QEMU drives the migration (the migrating client of docker/qemu-mig.sh):
 * two QEMUs (accel=qtest, the test is the guest driver), each attached to
 * its own `vfio-user-ts serve` process, migrated with QMP `migrate`.
 *
 * - edu: registers, the DMA buffer and MSI come over; on the destination a
 *   factorial with its interrupt lands as an MSI write in guest RAM.
 * - bigmem 64 MiB, bandwidth capped so pre-copy lasts: the guest writes
 *   device memory through BAR2 and has the device DMA into guest RAM
 *   during pre-copy; device memory (checksummed by the destination device
 *   against a model kept here) and the DMA-written guest pages arrive, and
 *   the source's DMA_LOGGING_REPORTs carried the DMA-dirtied pages.
 * - P2P servers (`serve --p2p`): QEMU walks the P2P states on both sides.
 *
 * Each test checks both servers' logs for the state sequence QEMU drove and
 * for the absence of warnings.
 */
import { afterEach, expect, it } from "vitest";
import { BigmemReg, fnv1a32 } from "../../devices/bigmem/bigmem.ts";
import { EDU_DMA_BUFFER, EDU_DMA_SIZE, EDU_ID, eduFactorial } from "../../devices/edu/edu.ts";
import { BIGMEM_DEVICE_ID, BIGMEM_VENDOR, BigmemGuest } from "./harness/bigmem-guest.ts";
import { describeQemuMig } from "./harness/describe-qemu.ts";
import { EDU_DEVICE, EDU_VENDOR, EduGuest, REG, bringUp, hex, msiCapability, pattern, pollUntil, programMsi, setMsiEnabled } from "./harness/edu-guest.ts";
import { describeMigration, settledRunState, startMigration } from "./harness/migrate.ts";
import { MIG_SLOT, MigrationPair, commandCounts, logged, states } from "./harness/mig-pair.ts";
import * as pci from "./harness/pci.ts";

const BDF = pci.bdf(0, MIG_SLOT, 0);
/** Guest RAM addresses the tests use (well inside 256 MiB, away from firmware). */
const RAM_A = 0x0100_0000n;
const RAM_B = 0x0200_0000n;
const MSI_ADDR = 0x0070_0000n;
const MSI_DATA = 0x4d53;
const MiB = 1 << 20;

let pair: MigrationPair | undefined;
afterEach(async () => {
  await pair?.stop();
  pair = undefined;
});

/** Runs `fn`; on failure appends the four logs to the message. */
async function withContext(p: MigrationPair, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    if (e instanceof Error) e.message += `\n${p.context()}`;
    throw e;
  }
}

describeQemuMig("QEMU-driven live migration of edu, bigmem and P2P servers", () => {
  it("edu: registers, DMA buffer and MSI come over; the destination's factorial interrupt lands in guest RAM", async () => {
    const p = (pair = new MigrationPair("vfu-mig-edu-"));
    await withContext(p, async () => {
      await p.startSource();
      const qt = p.src.qtest;
      expect(await pci.findDevice(qt, EDU_VENDOR, EDU_DEVICE)).toBe(BDF);
      const bar0 = await bringUp(qt, BDF, new pci.BarAllocator());
      const e = new EduGuest(qt, BDF, bar0);
      await e.write(REG.LIVENESS, 0x600dcafe);
      expect(await e.factorial(10)).toBe(eduFactorial(10));
      const data = pattern(EDU_DMA_SIZE, 0x1234);
      await qt.write(RAM_A, data);
      await e.dma(RAM_A, EDU_DMA_BUFFER, EDU_DMA_SIZE, 0x1);
      const msi = await msiCapability(qt, BDF);
      await programMsi(qt, BDF, msi, MSI_ADDR, MSI_DATA);
      await setMsiEnabled(qt, BDF, msi, true);
      const before = { liveness: await e.read(REG.LIVENESS), factorial: await e.read(REG.FACTORIAL), dmaSrc: await e.read(REG.DMA_SRC) };

      await p.startDestination();
      const markA = p.srvA.log.length;
      const markB = p.srvB.log.length;
      const m = await startMigration(p.src, p.dst, p.dir);
      const r = await m.finish(60_000);
      console.log(`[qemu-mig edu] ${describeMigration(r)}`);
      expect(r.status).toBe("completed");
      await m.waitDestination(["completed"], 30_000);
      expect(await settledRunState(p.dst)).toBe("running");
      expect(await settledRunState(p.src)).toBe("postmigrate");
      expect(states(p.srvA, markA)).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->STOP_COPY", "STOP_COPY->STOP"]);
      expect(states(p.srvB, markB)).toEqual(["RUNNING->RESUMING", "RESUMING->RUNNING"]);
      expect(commandCounts(p.srvB, markB).MIG_DATA_WRITE ?? 0).toBeGreaterThan(0);

      // the destination as the guest finds it: same BAR, same registers, same buffer
      const dq = p.dst.qtest;
      expect((await pci.readBar(dq, BDF, 0)).address).toBe(bar0);
      const d = new EduGuest(dq, BDF, bar0);
      expect(await d.read(REG.ID)).toBe(EDU_ID);
      expect({ liveness: await d.read(REG.LIVENESS), factorial: await d.read(REG.FACTORIAL), dmaSrc: await d.read(REG.DMA_SRC) }).toEqual(before);
      await dq.memset(RAM_B, EDU_DMA_SIZE, 0);
      await d.dma(EDU_DMA_BUFFER, RAM_B, EDU_DMA_SIZE, 0x3);
      expect((await dq.read(RAM_B, EDU_DMA_SIZE)).equals(data)).toBe(true);
      // MSI stayed enabled through QEMU's config state, and server B delivers: factorial with interrupt
      expect((await pci.cfgRead16(dq, BDF, msi.at + 2)) & 1).toBe(1);
      await dq.writel(MSI_ADDR, 0);
      await d.write(REG.STATUS, 0x80);
      await d.write(REG.FACTORIAL, 6);
      const { value } = await pollUntil("MSI write on the destination", () => dq.readl(MSI_ADDR), (v) => v !== 0, 30_000);
      expect(hex(value)).toBe(hex(MSI_DATA));
      expect(await d.read(REG.FACTORIAL)).toBe(eduFactorial(6));
      expect(p.srvA.problems(markA)).toEqual([]);
      expect(p.srvB.problems(markB)).toEqual([]);

      // QEMU disconnects the migrated source in STOP without DMA_LOGGING_STOP: an ordinary end
      const markEnd = p.srvA.log.length;
      await p.src.stop();
      await pollUntil("server A notices the source QEMU left", async () => logged(p.srvA, /client disconnected/, markEnd).length, (n) => n > 0, 30_000);
      expect(logged(p.srvA, /completed migration/, markEnd)).toHaveLength(1);
      expect(p.srvA.problems(markEnd)).toEqual([]);
    });
  }, 120_000);

  it("bigmem 64 MiB: device memory written through BAR2 and DMA into guest RAM during pre-copy all arrive", async () => {
    const SIZE = 64 * MiB;
    const p = (pair = new MigrationPair("vfu-mig-big-", { device: "bigmem", serverArgs: ["--opt", "size=64M"] }));
    await withContext(p, async () => {
      await p.startSource();
      const qt = p.src.qtest;
      expect(await pci.findDevice(qt, BIGMEM_VENDOR, BIGMEM_DEVICE_ID)).toBe(BDF);
      const g = await BigmemGuest.bringUp(qt, BDF);
      // the model: what device memory must hold
      const model = Buffer.alloc(SIZE);
      const put = async (offset: number, bytes: Buffer) => {
        await g.memWrite(BigInt(offset), bytes);
        bytes.copy(model, offset);
      };
      for (let i = 0; i < 16; i++) await put(i * 4 * MiB + 4096 * i, pattern(8192, 0x100 + i));
      // a guest page the device will overwrite by DMA during pre-copy (non-zero, so its first pass is real data)
      await qt.write(RAM_B, pattern(16 * 4096, 0x77));
      // and the device-memory range that DMA will copy out
      const dmaOut = pattern(16 * 4096, 0x99);
      await put(32 * MiB, dmaOut);

      await p.startDestination();
      const markA = p.srvA.log.length;
      const markB = p.srvB.log.length;
      // ~8 MiB/s: 64 MiB of device state keeps pre-copy going for several seconds
      const m = await startMigration(p.src, p.dst, p.dir, { parameters: { "max-bandwidth": 8 * MiB } });
      await m.waitSource(["active"], 30_000);
      await pollUntil("source device in PRE_COPY", async () => states(p.srvA, markA).join(","), (s) => s.includes("RUNNING->PRE_COPY"), 30_000);
      // guest RAM's first pass is quick (mostly zero pages): once nothing of it remains, RAM_B's old
      // content has been sent, so the DMA below must reach the destination through the dirty log
      const t0 = performance.now();
      await pollUntil(
        "the first pass over guest RAM done",
        async () => (await p.src.qmp.execute<{ ram?: { remaining?: number; normal?: number } }>("query-migrate")).ram?.remaining ?? -1,
        (n) => n >= 0 && n < 4096 * 16,
        30_000,
      );
      console.log(`[qemu-mig bigmem] first RAM pass done ${(performance.now() - t0).toFixed(0)} ms after pre-copy began`);
      // during pre-copy: device memory through BAR2, and device DMA into guest RAM (dirtying it behind QEMU's back)
      for (let i = 0; i < 8; i++) await put(i * 8 * MiB + 12_288, pattern(4096, 0x200 + i));
      await g.dma(RAM_B, BigInt(32 * MiB), BigInt(dmaOut.length), true);
      const stillPrecopy = !states(p.srvA, markA).some((s) => s.includes("STOP_COPY"));
      const r = await m.finish(120_000);
      console.log(`[qemu-mig bigmem] ${describeMigration(r)}; writes landed during pre-copy: ${stillPrecopy}`);
      expect(r.status).toBe("completed");
      expect(stillPrecopy).toBe(true);
      await m.waitDestination(["completed"], 30_000);
      expect(states(p.srvA, markA)).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->STOP_COPY", "STOP_COPY->STOP"]);
      expect(states(p.srvB, markB)).toEqual(["RUNNING->RESUMING", "RESUMING->RUNNING"]);
      // the source told QEMU about the pages its DMA wrote
      const reports = logged(p.srvA, /^DMA logging report$/, markA);
      const reported = reports.reduce((n, rec) => n + Number(rec.dirty ?? 0), 0);
      console.log(`[qemu-mig bigmem] ${reports.length} DMA_LOGGING_REPORTs from QEMU, ${reported} dirty pages in them`);
      expect(reported).toBeGreaterThanOrEqual(16);

      const dq = p.dst.qtest;
      const d = new BigmemGuest(dq, BDF, g.bar0, g.bar2);
      expect((await pci.readBar(dq, BDF, 2)).address).toBe(g.bar2);
      // what the device DMA'd out of [32 MiB, +64 KiB) during pre-copy, page 3 included (rewritten through BAR2 just before)
      const dmaExpected = model.subarray(32 * MiB, 32 * MiB + dmaOut.length);
      expect((await p.src.qtest.read(RAM_B, dmaOut.length)).equals(dmaExpected)).toBe(true);
      expect((await dq.read(RAM_B, dmaOut.length)).equals(dmaExpected)).toBe(true);
      expect(hex(await d.checksum(0n, BigInt(SIZE)))).toBe(hex(fnv1a32(model)));
      for (let i = 0; i < 8; i++) expect((await d.memRead(BigInt(i * 8 * MiB + 12_288), 4096)).equals(model.subarray(i * 8 * MiB + 12_288, i * 8 * MiB + 16_384))).toBe(true);
      expect(await d.read(BigmemReg.GENERATION)).toBe(1);
      // and it keeps working there
      await d.memWritel(0x100n, 0xfeedf00d);
      expect(hex(await d.memReadl(0x100n))).toBe(hex(0xfeedf00d));
      expect(p.srvA.problems(markA)).toEqual([]);
      expect(p.srvB.problems(markB)).toEqual([]);
    });
  }, 240_000);

  it("P2P servers: the source goes through PRE_COPY_P2P, the destination through RUNNING_P2P; edu's registers arrive", async () => {
    const p = (pair = new MigrationPair("vfu-mig-p2p-", { serverArgs: ["--p2p"] }));
    await withContext(p, async () => {
      await p.startSource();
      const qt = p.src.qtest;
      const bar0 = await bringUp(qt, BDF, new pci.BarAllocator());
      const e = new EduGuest(qt, BDF, bar0);
      await e.write(REG.LIVENESS, 0x12345678);
      expect(await e.factorial(7)).toBe(eduFactorial(7));
      await p.startDestination();
      const markA = p.srvA.log.length;
      const markB = p.srvB.log.length;
      const m = await startMigration(p.src, p.dst, p.dir);
      const r = await m.finish(60_000);
      console.log(`[qemu-mig p2p] ${describeMigration(r)}`);
      expect(r.status).toBe("completed");
      await m.waitDestination(["completed"], 30_000);
      expect(states(p.srvA, markA)).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->PRE_COPY_P2P", "PRE_COPY_P2P->STOP_COPY", "STOP_COPY->STOP"]);
      expect(states(p.srvB, markB)).toEqual(["RUNNING->RESUMING", "RESUMING->RUNNING_P2P", "RUNNING_P2P->RUNNING"]);
      const d = new EduGuest(p.dst.qtest, BDF, bar0);
      expect(await d.read(REG.LIVENESS)).toBe(~0x12345678 >>> 0);
      expect(await d.read(REG.FACTORIAL)).toBe(eduFactorial(7));
      expect(p.srvA.problems(markA)).toEqual([]);
      expect(p.srvB.problems(markB)).toEqual([]);
    });
  }, 120_000);
});
