/**
 * The tutorial device attached to real QEMU (11.1.3, `vfio-user-pci`, q35,
 * accel=qtest): the test plays the guest driver as the tutorial's "Serve it
 * and attach QEMU" describes: finds 1234:c0de on the PCI bus, sizes and maps
 * BAR0, enables it, and uses the counter, the alarm over INTx and MSI, and
 * the DMA report into guest RAM. Skipped (with the reason) without QEMU,
 * unless VFIO_USER_REQUIRE_QEMU=1. Uses the e2e harness (test/e2e/harness).
 */
import { afterAll, beforeAll, expect, it } from "vitest";
import { COUNTER_ID, IRQ_ALARM, IRQ_REPORT, REG, counterFactory } from "../../devices/tutorial/counter.ts";
import { describeQemu } from "../e2e/harness/describe-qemu.ts";
import { msiCapability, pollUntil, programMsi, setMsiEnabled } from "../e2e/harness/edu-guest.ts";
import * as pci from "../e2e/harness/pci.ts";
import { startQemu, type QemuInstance } from "../e2e/harness/qemu.ts";
import { startServer, type ServerHandle } from "../e2e/harness/server.ts";
import { makeSharedDir, type SharedDir } from "../e2e/harness/shared-dir.ts";

const SLOT = 4;
/** q35: slot 4, INTA -> IOAPIC input 20 (as the e2e harness measured). */
const INTX_GSI = 20;
const REPORT_AT = 0x0010_0000n;
const MSI_ADDR = 0x0070_0000n;
const MSI_DATA = 0x4d53;

describeQemu("the tutorial device under QEMU 11.1.3 (qtest)", () => {
  let dir: SharedDir;
  let srv: ServerHandle;
  let q: QemuInstance | undefined;
  let bdf = 0;
  let bar0 = 0n;

  const reg = (r: number) => bar0 + BigInt(r);
  const context = () => `--- QEMU stderr ---\n${q?.stderr().split("\n").filter((l) => !/^\[[RS] \+/.test(l)).join("\n") ?? ""}\n--- server log ---\n${srv?.log.tail(30) ?? ""}`;

  beforeAll(async () => {
    dir = makeSharedDir();
    srv = startServer({ dir, device: counterFactory.create({}), trace: false, level: "warn" });
    try {
      q = await startQemu({ dir, vfioUserSocket: srv.socketPath, deviceProps: { addr: `${SLOT}.0` } });
    } catch (err) {
      (err as Error).message += `\n${context()}`;
      throw err;
    }
  });

  afterAll(async () => {
    await q?.stop();
    srv?.close();
    dir?.cleanup();
  });

  it("QEMU attaches; the guest finds 1234:c0de, sizes BAR0 (4 KiB) and maps it", async () => {
    const qt = q!.qtest;
    const found = await pci.findDevice(qt, 0x1234, 0xc0de);
    expect(found, context()).not.toBeNull();
    bdf = found!;
    expect(await pci.barSize(qt, bdf, 0)).toBe(4096n);
    expect(await pci.barSize(qt, bdf, 1)).toBe(0n);
    expect(await pci.cfgRead8(qt, bdf, pci.PCI_INTERRUPT_PIN)).toBe(1);
    bar0 = new pci.BarAllocator().alloc32(4096n);
    await pci.assignBar(qt, bdf, 0, bar0);
    await pci.enableDevice(qt, bdf, { memory: true, busMaster: true });
    expect(await qt.readl(reg(REG.ID))).toBe(COUNTER_ID);
  });

  it("counts: COUNT, ADD; a 16-bit read gets all ones", async () => {
    const qt = q!.qtest;
    await qt.writel(reg(REG.COUNT), 40);
    await qt.writel(reg(REG.ADD), 2);
    expect(await qt.readl(reg(REG.COUNT))).toBe(42);
    expect(await qt.readw(reg(REG.COUNT))).toBe(0xffff);
  });

  it("the alarm raises INTx (IOAPIC input 20); acknowledging lowers it", async () => {
    const qt = q!.qtest;
    await qt.irqInterceptIn("ioapic");
    await qt.writel(reg(REG.ALARM), 50);
    await qt.writel(reg(REG.ADD), 8);
    await qt.waitIrq("raise", INTX_GSI, 3000);
    expect(await qt.readl(reg(REG.IRQ_STATUS))).toBe(IRQ_ALARM);
    await qt.writel(reg(REG.IRQ_STATUS), IRQ_ALARM);
    await qt.readl(reg(REG.ID)); // the next BAR access is QEMU's EOI
    await pollUntil("INTx low", async () => qt.irqState(INTX_GSI), (s) => !s);
    expect(await qt.readl(reg(REG.IRQ_STATUS))).toBe(0);
  });

  it("REPORT writes { COUNT, ALARM } into guest RAM by DMA and signals with MSI", async () => {
    const qt = q!.qtest;
    const msi = await msiCapability(qt, bdf);
    await programMsi(qt, bdf, msi, MSI_ADDR, MSI_DATA);
    await qt.writel(MSI_ADDR, 0);
    await setMsiEnabled(qt, bdf, msi, true);
    await qt.write(REPORT_AT, Buffer.alloc(8, 0xee));
    await qt.writel(reg(REG.REPORT_LO), Number(REPORT_AT & 0xffff_ffffn));
    await qt.writel(reg(REG.REPORT_HI), 0);
    await qt.writel(reg(REG.REPORT), 1);
    const { value } = await pollUntil("MSI write", () => qt.readl(MSI_ADDR), (v) => v !== 0);
    expect(value).toBe(MSI_DATA);
    const record = await qt.read(REPORT_AT, 8);
    expect([record.readUInt32LE(0), record.readUInt32LE(4)]).toEqual([50, 50]);
    expect(await qt.readl(reg(REG.IRQ_STATUS))).toBe(IRQ_REPORT);
    expect(srv.problems()).toEqual([]);
  });
});
