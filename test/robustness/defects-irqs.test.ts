/**
 * SET_IRQS as QEMU drives MSI-X (issue 9, part 2, item 1).
 *
 * spec (VFIO_USER_DEVICE_SET_IRQS, DATA_EVENTFD): "If no file descriptors
 * are provided, this de-assigns the specified previously configured
 * interrupts." QEMU's vfio-user client sends one SET_IRQS per run of used /
 * unused vectors (hw/vfio-user/device.c, irq_howmany): with vectors 0 and 2
 * in use that is [0, 1) with one fd, [1, 2) with none, [2, 3) with one fd,
 * and it stops at the first error reply. The real client is in
 * test/e2e/msix-qemu.test.ts; this file pins the server side of it.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Command, IrqIndex, IrqSetFlags, RegionIndex, Errno } from "../../protocol/index.ts";
import { BigmemDevice, BigmemReg, BIGMEM_MSIX_VECTOR } from "../../devices/bigmem/bigmem.ts";
import { native } from "../../src/transport/native.ts";
import { readEventfd } from "../../src/client/index.ts";
import { RawClient, eventfd, eventually, fdTargets, le, startInProcessServer, type InProcessServer } from "./raw-client.ts";

const TRIGGER_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER;
const MSIX = IrqIndex.MSIX;

const setIrqs = (o: { flags: number; index: number; start?: number; count: number }): Buffer =>
  le().u32(20).u32(o.flags).u32(o.index).u32(o.start ?? 0).u32(o.count).buf;

/** Eventfds open in this process (the in-process server's copies included). */
const eventfdsOpen = (): number => fdTargets("self").filter((t) => t === "anon_inode:[eventfd]").length;

/** Reads (and so clears) an eventfd's counter; 0 when nothing was signalled. */
const drain = readEventfd;

let srv: InProcessServer;
let c: RawClient;
const mine: number[] = [];

beforeAll(async () => {
  srv = startInProcessServer({ device: new BigmemDevice({ size: "64K" }) });
  c = await RawClient.ready(srv.socketPath);
});
afterAll(() => {
  c?.close();
  for (const fd of mine) native.close(fd);
  srv?.stop();
});

function efd(): number {
  const fd = eventfd();
  mine.push(fd);
  return fd;
}

describe("SET_IRQS DATA_EVENTFD | ACTION_TRIGGER without fds de-assigns", () => {
  it("QEMU's sequence for vectors 0 and 2 in use: [0] with an fd, [1] without, [2] with an fd -> all succeed", async () => {
    const irq = srv.server.endpoint.irq;
    const a = efd();
    const b = efd();
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_EVENTFD, index: MSIX, start: 0, count: 1 }), { fds: [a] })).toBe(0);
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_EVENTFD, index: MSIX, start: 1, count: 1 }))).toBe(0);
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_EVENTFD, index: MSIX, start: 2, count: 1 }), { fds: [b] })).toBe(0);
    expect(irq.eventfd(MSIX, 0)).toBeGreaterThanOrEqual(0);
    expect(irq.eventfd(MSIX, 1)).toBe(-1);
    expect(irq.eventfd(MSIX, 2)).toBeGreaterThanOrEqual(0);

    // and the interrupts arrive on those eventfds once the guest enabled MSI-X (bus master on)
    const cap = srv.server.endpoint.pci.config.msix!.capOffset;
    await c.write(RegionIndex.CONFIG, 0x04n, le().u16(0x6).buf);
    await c.write(RegionIndex.CONFIG, BigInt(cap + 2), le().u16(0x8000).buf);
    expect(srv.server.endpoint.irq.mode).toBe("msix");
    await c.write(RegionIndex.BAR0, BigInt(BigmemReg.IRQ_RAISE), le().u32(0x1).buf);
    expect(drain(a)).toBe(1n);
    expect(BIGMEM_MSIX_VECTOR.DMA).toBe(2);
    await c.write(RegionIndex.BAR0, BigInt(BigmemReg.DMA_LENGTH), le().u32(0).buf);
    await c.write(RegionIndex.BAR0, BigInt(BigmemReg.DMA_CMD), le().u32(0x5).buf); // start, to device, interrupt
    expect(await eventually(() => irq.delivered[MSIX]! >= 2)).toBe(true);
    expect(drain(b)).toBe(1n);
    expect(drain(a)).toBe(0n);
  });

  it("de-assigning a range closes the server's eventfds for it and leaves the others", async () => {
    const irq = srv.server.endpoint.irq;
    const fds = [efd(), efd(), efd()];
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_EVENTFD, index: MSIX, count: 3 }), { fds })).toBe(0);
    const held = eventfdsOpen();
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_EVENTFD, index: MSIX, start: 1, count: 2 }))).toBe(0);
    expect([0, 1, 2].map((v) => irq.eventfd(MSIX, v) >= 0)).toEqual([true, false, false]);
    expect(eventfdsOpen()).toBe(held - 2);
    // de-assigning what is already unassigned is fine
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_EVENTFD, index: MSIX, start: 1, count: 2 }))).toBe(0);
    expect(eventfdsOpen()).toBe(held - 2);
  });

  it("a de-assign beyond the vectors is still refused (EINVAL), nothing changes", async () => {
    const irq = srv.server.endpoint.irq;
    const before = [0, 1, 2].map((v) => irq.eventfd(MSIX, v));
    expect(await c.errno(Command.DEVICE_SET_IRQS, setIrqs({ flags: TRIGGER_EVENTFD, index: MSIX, start: 2, count: 2 }))).toBe(Errno.EINVAL);
    expect([0, 1, 2].map((v) => irq.eventfd(MSIX, v))).toEqual(before);
  });
});
