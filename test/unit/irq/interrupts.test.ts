import { readSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { Errno, IrqIndex } from "../../../protocol/constants.ts";
import { InterruptController } from "../../../src/irq/interrupts.ts";
import { silentLogger } from "../../../src/log.ts";
import { native } from "../../../src/transport/native.ts";

const opened: number[] = [];
function eventfd(): number {
  const fd = native.eventfd(0, 0);
  opened.push(fd);
  return fd;
}
/** Counter value of an eventfd (0 when it was not signalled). */
function drain(fd: number): number {
  const buf = Buffer.alloc(8);
  try {
    readSync(fd, buf);
  } catch {
    return 0; // EAGAIN: non-blocking and empty
  }
  return Number(buf.readBigUInt64LE(0));
}

function setup(pin = true, counts = [1, 4, 8, 0, 0]) {
  const config = { msi: { enabled: false }, msix: { enabled: false }, intxDisabled: false, status: false, setInterruptStatus(a: boolean) { this.status = a; } };
  let running = true;
  const closed: number[] = [];
  const irq = new InterruptController(counts, config, pin, () => running, silentLogger(), (fd) => closed.push(fd));
  return { irq, config, closed, setRunning: (r: boolean) => (running = r) };
}

afterEach(() => {
  for (const fd of opened.splice(0)) native.close(fd);
});

describe("InterruptController", () => {
  it("INTx: fires once, automasks, and fires again on unmask while the level is high", () => {
    const { irq, config } = setup();
    const fd = eventfd();
    irq.setEventfds(IrqIndex.INTX, 0, [fd]);
    irq.setLevel(true);
    expect(config.status).toBe(true);
    expect(drain(fd)).toBe(1);
    irq.setLevel(true); // still masked: nothing new
    expect(drain(fd)).toBe(0);
    irq.setMasked(IrqIndex.INTX, 0, [true], false);
    expect(drain(fd)).toBe(1);
    irq.setLevel(false);
    irq.setMasked(IrqIndex.INTX, 0, [true], false);
    expect(drain(fd)).toBe(0);
    expect(config.status).toBe(false);
  });

  it("INTx is held while the command register disables it and while the device is stopped", () => {
    const { irq, config, setRunning } = setup();
    const fd = eventfd();
    irq.setEventfds(IrqIndex.INTX, 0, [fd]);
    config.intxDisabled = true;
    irq.setLevel(true);
    expect(drain(fd)).toBe(0);
    config.intxDisabled = false;
    setRunning(false);
    irq.reevaluate();
    expect(drain(fd)).toBe(0);
    setRunning(true);
    irq.reevaluate();
    expect(drain(fd)).toBe(1);
  });

  it("clientHoldsIntx: set when INTx is signalled and auto-masked, cleared by the client's unmask and by reset", () => {
    const { irq } = setup();
    const fd = eventfd();
    irq.setEventfds(IrqIndex.INTX, 0, [fd]);
    expect(irq.clientHoldsIntx).toBe(false);
    irq.setLevel(true);
    expect(drain(fd)).toBe(1);
    expect(irq.clientHoldsIntx).toBe(true);
    irq.setLevel(false);
    expect(irq.clientHoldsIntx).toBe(true); // the client still has it until it unmasks
    irq.setMasked(IrqIndex.INTX, 0, [true], false);
    expect(irq.clientHoldsIntx).toBe(false);
    irq.setLevel(true);
    expect(irq.clientHoldsIntx).toBe(true);
    irq.reset();
    expect(irq.clientHoldsIntx).toBe(false);
  });

  it("adoptHeldIntx: one signal when the device runs, regardless of INTX_DISABLE; auto-masked after it", () => {
    const { irq, config, setRunning } = setup();
    const fd = eventfd();
    irq.setEventfds(IrqIndex.INTX, 0, [fd]);
    config.intxDisabled = true;
    setRunning(false);
    irq.adoptHeldIntx(true);
    irq.reevaluate();
    expect(drain(fd)).toBe(0); // not running: held
    setRunning(true);
    irq.reevaluate();
    expect(drain(fd)).toBe(1);
    expect(irq.isMasked(IrqIndex.INTX, 0)).toBe(true);
    irq.reevaluate();
    expect(drain(fd)).toBe(0); // once only
    irq.adoptHeldIntx(false);
    irq.setMasked(IrqIndex.INTX, 0, [true], false);
    expect(drain(fd)).toBe(0); // device level low: nothing
  });

  it("MSI and MSI-X go to the vector's eventfd of the enabled mode only", () => {
    const { irq, config } = setup();
    const msi = [eventfd(), eventfd()];
    const msix = [eventfd()];
    irq.setEventfds(IrqIndex.MSI, 0, msi);
    irq.setEventfds(IrqIndex.MSIX, 3, msix);
    expect(irq.notify(0)).toBe(false); // INTx mode
    config.msi.enabled = true;
    expect(irq.mode).toBe("msi");
    expect(irq.notify(1)).toBe(true);
    expect(irq.notify(2)).toBe(false); // no eventfd
    expect(irq.notify(9)).toBe(false); // out of range
    expect(drain(msi[1]!)).toBe(1);
    config.msix.enabled = true;
    expect(irq.mode).toBe("msix");
    expect(irq.notify(3)).toBe(true);
    expect(drain(msix[0]!)).toBe(1);
    expect(drain(msi[0]!)).toBe(0);
  });

  it("replacing and tearing down eventfds closes the old ones; ranges are checked", () => {
    const { irq, closed } = setup();
    const a = eventfd();
    const b = eventfd();
    irq.setEventfds(IrqIndex.MSI, 0, [a]);
    irq.setEventfds(IrqIndex.MSI, 0, [b]);
    expect(closed).toEqual([a]);
    irq.disableIndex(IrqIndex.MSI);
    expect(closed).toEqual([a, b]);
    expect(() => irq.setEventfds(IrqIndex.MSI, 3, [1, 2])).toThrowError(expect.objectContaining({ errno: Errno.EINVAL }));
    expect(() => irq.checkRange(7, 0, 1)).toThrowError(expect.objectContaining({ errno: Errno.EINVAL }));
  });

  it("releaseAll closes every fd the client gave and clears masks", () => {
    const { irq, closed } = setup();
    const fds = [eventfd(), eventfd(), eventfd()];
    irq.setEventfds(IrqIndex.INTX, 0, [fds[0]!]);
    irq.setEventfds(IrqIndex.MSIX, 0, [fds[1]!, fds[2]!]);
    irq.setMasked(IrqIndex.INTX, 0, [true], true);
    irq.releaseAll();
    expect(closed.sort()).toEqual([...fds].sort());
    expect(irq.isMasked(IrqIndex.INTX, 0)).toBe(false);
    expect(irq.eventfd(IrqIndex.MSIX, 1)).toBe(-1);
  });
});
