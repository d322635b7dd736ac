/**
 * MSI-X pending bits (issue 9, part 2, item 11: `Interrupts.notify` promised
 * them; nothing set them). A vector the client gave no eventfd is a vector
 * it has masked (QEMU takes eventfds away from masked and unused vectors):
 * an interrupt on it sets its PBA bit, and the held message is sent, and the
 * bit cleared, when the vector gets an eventfd. QEMU's side of it is in
 * test/e2e/msix-qemu.test.ts.
 */
import { afterEach, describe, expect, it } from "vitest";
import { IrqIndex } from "../../../protocol/constants.ts";
import { InterruptController } from "../../../src/irq/interrupts.ts";
import { silentLogger } from "../../../src/log.ts";
import { MsixTable } from "../../../src/pci/msix-table.ts";
import { native } from "../../../src/transport/native.ts";
import { createEventfd, readEventfd } from "../../../src/client/index.ts";

const opened: number[] = [];
function eventfd(): number {
  const fd = createEventfd();
  opened.push(fd);
  return fd;
}
const drain = (fd: number): number => Number(readEventfd(fd));
afterEach(() => {
  for (const fd of opened.splice(0)) native.close(fd);
});

function setup() {
  const pba = new MsixTable(3);
  const config = { msi: { enabled: false }, msix: { enabled: true }, intxDisabled: false, setInterruptStatus() {} };
  let running = true;
  const irq = new InterruptController([0, 0, 3, 0, 0], config, false, () => running, silentLogger(), (fd) => native.close(fd), pba);
  return { irq, pba, setRunning: (r: boolean) => (running = r) };
}

describe("MSI-X: an interrupt on a vector without an eventfd is held pending", () => {
  it("sets the PBA bit and returns false; the message goes out when the vector gets its eventfd", () => {
    const { irq, pba } = setup();
    const a = eventfd();
    irq.setEventfds(IrqIndex.MSIX, 0, [native.dup(a)]);
    expect(irq.notify(1)).toBe(false);
    expect(pba.isPending(1)).toBe(true);
    expect(pba.readPba(0, 8)[0]).toBe(0b010);
    // vector 0 has its eventfd: delivered, nothing pending
    expect(irq.notify(0)).toBe(true);
    expect(drain(a)).toBe(1);
    expect(pba.isPending(0)).toBe(false);
    // the client unmasks vector 1 (gives it an eventfd): the held message goes out once
    const b = eventfd();
    irq.setEventfds(IrqIndex.MSIX, 1, [native.dup(b)]);
    expect(drain(b)).toBe(1);
    expect(pba.isPending(1)).toBe(false);
    irq.setEventfds(IrqIndex.MSIX, 1, [native.dup(b)]);
    expect(drain(b)).toBe(0);
  });

  it("several interrupts while masked are one pending message; a de-assigned vector holds them again", () => {
    const { irq, pba } = setup();
    const c = eventfd();
    irq.setEventfds(IrqIndex.MSIX, 2, [native.dup(c)]);
    irq.clearEventfds(IrqIndex.MSIX, 2, 1);
    for (let i = 0; i < 5; i++) expect(irq.notify(2)).toBe(false);
    expect(pba.isPending(2)).toBe(true);
    irq.setEventfds(IrqIndex.MSIX, 2, [native.dup(c)]);
    expect(drain(c)).toBe(1);
  });

  it("a stopped device sends nothing and sets nothing; a pending vector waits for the device to run", () => {
    const { irq, pba, setRunning } = setup();
    expect(irq.notify(1)).toBe(false);
    setRunning(false);
    expect(irq.notify(2)).toBe(false);
    expect(pba.isPending(2)).toBe(false);
    const b = eventfd();
    irq.setEventfds(IrqIndex.MSIX, 1, [native.dup(b)]);
    expect(drain(b)).toBe(0);
    expect(pba.isPending(1)).toBe(true);
    // the device runs again (the endpoint calls reevaluate): the held message goes out
    setRunning(true);
    irq.reevaluate();
    expect(drain(b)).toBe(1);
    expect(pba.isPending(1)).toBe(false);
  });

  it("out-of-range vectors are refused and touch no bit", () => {
    const { irq, pba } = setup();
    expect(irq.notify(3)).toBe(false);
    expect(irq.notify(-1)).toBe(false);
    expect(irq.notify(0.5)).toBe(false);
    expect([0, 1, 2].map((v) => pba.isPending(v))).toEqual([false, false, false]);
  });
});
