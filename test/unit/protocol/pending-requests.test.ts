import { afterEach, describe, expect, it, vi } from "vitest";
import { Command, Errno, HeaderFlags } from "../../../protocol/constants.ts";
import type { Frame } from "../../../protocol/frame.ts";
import { PendingRequests } from "../../../protocol/pending-requests.ts";

const reply = (msgId: number, command: number, error = 0): Frame => ({
  header: { msgId, command, size: 16, flags: HeaderFlags.TYPE_REPLY | (error ? HeaderFlags.ERROR : 0), error },
  body: Buffer.alloc(0),
  fds: [],
});

afterEach(() => void vi.useRealTimers());

describe("PendingRequests", () => {
  it("matches replies by msgId and command, and skips msgIds in flight", async () => {
    const p = new PendingRequests(1000, () => new Error("timeout"));
    const ids: number[] = [];
    const a = p.start(Command.DMA_READ, (id) => ids.push(id));
    const b = p.start(Command.DMA_WRITE, (id) => ids.push(id));
    expect(ids).toEqual([0, 1]);
    expect(p.settle(reply(1, Command.DMA_READ))).toBe(false); // wrong command for msgId 1
    expect(p.settle(reply(7, Command.DMA_READ))).toBe(false);
    expect(p.settle(reply(1, Command.DMA_WRITE))).toBe(true);
    expect(p.settle(reply(0, Command.DMA_READ, Errno.EFAULT))).toBe(true);
    await expect(b).resolves.toMatchObject({ header: { msgId: 1 } });
    await expect(a).rejects.toMatchObject({ errno: Errno.EFAULT });
    expect(p.size).toBe(0);
  });

  it("wraps msgIds at 16 bits without reusing one still outstanding", () => {
    const p = new PendingRequests(1000, () => new Error("timeout"));
    let first = -1;
    void p.start(Command.DMA_READ, (id) => (first = id)).catch(() => {});
    for (let i = 0; i < 0xffff; i++) p.nextId();
    expect(p.nextId()).not.toBe(first);
    p.rejectAll(new Error("closed"));
  });

  it("times out with the caller's error and then ignores the late reply", async () => {
    vi.useFakeTimers();
    const p = new PendingRequests(50, (cmd, id) => new Error(`t ${cmd} ${id}`));
    let msgId = -1;
    const a = p.start(Command.DMA_READ, (id) => (msgId = id));
    vi.advanceTimersByTime(51);
    await expect(a).rejects.toThrow(`t ${Command.DMA_READ} ${msgId}`);
    expect(p.settle(reply(msgId, Command.DMA_READ))).toBe(false);
  });

  it("rejectAll fails everything outstanding", async () => {
    const p = new PendingRequests(1000, () => new Error("timeout"));
    const a = p.start(Command.DMA_READ, () => {});
    p.rejectAll(new Error("gone"));
    await expect(a).rejects.toThrow("gone");
    expect(p.size).toBe(0);
  });
});
