/**
 * INTx across a migration. A client that migrates the guest's PCI state
 * (QEMU's vfio-pci moves the PCI irq_state) restores the INTx line as it was
 * on the source, but not its own record of having taken the interrupt; if
 * the source's client held INTx (signalled, not yet unmasked) when the device
 * stopped, the destination must signal it once more when it runs, or the
 * destination client keeps the line up with nothing that lowers it (a Linux
 * guest with uio_pci_generic saw a storm of 290,000 interrupts).
 *
 * Two edu servers, our client on each side, a real state stream between them.
 */
import { mkdtempSync, readSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { EduDevice } from "../../devices/edu/edu.ts";
import { IrqIndex, MigState, RegionIndex } from "../../protocol/constants.ts";
import { VfioUserClient } from "../../src/client/client.ts";
import { VfioUserServer } from "../../src/server/server.ts";
import { native } from "../../src/transport/native.ts";

const cleanups: Array<() => void | Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const PCI_COMMAND = 0x04;
const MEMORY = 0x0002;
const INTX_DISABLE = 0x0400;

function eventfd(): number {
  const fd = native.eventfd(0, 0);
  cleanups.push(() => {
    native.close(fd);
  });
  return fd;
}
/** The eventfd's counter, read and reset (0: not signalled). */
function drain(fd: number): number {
  const buf = Buffer.alloc(8);
  try {
    readSync(fd, buf);
  } catch {
    return 0;
  }
  return Number(buf.readBigUInt64LE(0));
}

async function side(dir: string, name: string): Promise<{ c: VfioUserClient; fd: number }> {
  const server = new VfioUserServer({ device: new EduDevice({}) });
  server.listen(join(dir, name));
  const c = await VfioUserClient.connect(join(dir, name));
  cleanups.push(async () => {
    c.close();
    await server.close();
  });
  await c.negotiate();
  const fd = eventfd();
  await c.setIrqEventfds(IrqIndex.INTX, 0, [fd]);
  return { c, fd };
}

async function setCommand(c: VfioUserClient, value: number): Promise<void> {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(value);
  await c.regionWrite(RegionIndex.CONFIG, PCI_COMMAND, b);
}

async function migrate(src: VfioUserClient, dst: VfioUserClient): Promise<void> {
  await src.setMigState(MigState.STOP_COPY);
  await dst.setMigState(MigState.RESUMING);
  for (;;) {
    const d = await src.migDataRead();
    if (d.length === 0) break;
    await dst.migDataWrite(d);
  }
  await src.setMigState(MigState.STOP);
}

describe("INTx held by the client when the device stops for migration", () => {
  it("the destination signals INTx once when it runs, even with INTX_DISABLE set (the client gates the line), and not again until unmasked", async () => {
    const dir = mkdtempSync(join(tmpdir(), "vfu-intx-mig-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const a = await side(dir, "a.sock");
    const b = await side(dir, "b.sock");
    await setCommand(a.c, MEMORY);
    await a.c.regionWrite(RegionIndex.BAR0, 0x60, Buffer.from([1, 0, 0, 0])); // edu: raise
    expect(drain(a.fd)).toBe(1);
    // the guest's handler masks INTx in the command register, as uio_pci_generic does
    await setCommand(a.c, MEMORY | INTX_DISABLE);
    await migrate(a.c, b.c);
    expect(drain(b.fd)).toBe(0); // RESUMING → STOP: not running yet
    await b.c.setMigState(MigState.RUNNING);
    expect(drain(b.fd)).toBe(1);
    // auto-masked again: the device's level is still high but nothing more until the client unmasks
    await b.c.regionWrite(RegionIndex.BAR0, 0x64, Buffer.from([1, 0, 0, 0])); // edu: acknowledge
    await setCommand(b.c, MEMORY);
    expect(drain(b.fd)).toBe(0);
    await b.c.unmaskIrq(IrqIndex.INTX);
    expect(drain(b.fd)).toBe(0); // level low now: no new interrupt
  });

  it("a client that unmasked before the device stopped gets no extra interrupt on the destination", async () => {
    const dir = mkdtempSync(join(tmpdir(), "vfu-intx-mig-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const a = await side(dir, "a.sock");
    const b = await side(dir, "b.sock");
    await setCommand(a.c, MEMORY);
    await a.c.regionWrite(RegionIndex.BAR0, 0x60, Buffer.from([1, 0, 0, 0]));
    expect(drain(a.fd)).toBe(1);
    await a.c.regionWrite(RegionIndex.BAR0, 0x64, Buffer.from([1, 0, 0, 0]));
    await a.c.unmaskIrq(IrqIndex.INTX);
    await migrate(a.c, b.c);
    await b.c.setMigState(MigState.RUNNING);
    expect(drain(b.fd)).toBe(0);
    // and INTx works normally there
    await b.c.regionWrite(RegionIndex.BAR0, 0x60, Buffer.from([1, 0, 0, 0]));
    expect(drain(b.fd)).toBe(1);
  });
});
