/**
 * Request/reply correlation (spec: "the reply ... carries the message ID of
 * the command it answers"): msgId allocation, matching a reply to its
 * command, error replies turned into VfioUserError, and timeouts. Used by
 * both directions: the server's DMA_READ/WRITE to the client, and the
 * client's commands to the server.
 */
import { COMMAND_NAMES, Errno, HeaderFlags } from "./constants.ts";
import { VfioUserError, errnoName } from "./errors.ts";
import type { Frame } from "./frame.ts";

interface Pending {
  command: number;
  resolve(frame: Frame): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

export class PendingRequests {
  private readonly pending = new Map<number, Pending>();
  private nextMsgId = 0;

  constructor(
    private readonly timeoutMs: number,
    /** The error a request gets when no reply came in time. */
    private readonly timeoutError: (command: number, msgId: number) => Error,
  ) {}

  get size(): number {
    return this.pending.size;
  }

  /** A msgId no outstanding request uses (also for commands sent with No_reply). */
  nextId(): number {
    let msgId = this.nextMsgId;
    while (this.pending.has(msgId)) msgId = (msgId + 1) & 0xffff;
    this.nextMsgId = (msgId + 1) & 0xffff;
    return msgId;
  }

  /** Picks a free msgId, calls `send(msgId)`, and resolves with the reply frame. */
  start(command: number, send: (msgId: number) => void): Promise<Frame> {
    const msgId = this.nextId();
    return new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(msgId);
        reject(this.timeoutError(command, msgId));
      }, this.timeoutMs);
      this.pending.set(msgId, { command, resolve, reject, timer });
      send(msgId);
    });
  }

  /**
   * Settles the request a reply frame answers: resolved with the frame, or
   * rejected with the errno of an error reply. False when no request of
   * ours matches (unknown msgId, another command, or one that timed out).
   */
  settle(frame: Frame): boolean {
    const h = frame.header;
    const p = this.pending.get(h.msgId);
    if (!p || p.command !== h.command) return false;
    this.pending.delete(h.msgId);
    clearTimeout(p.timer);
    if (h.flags & HeaderFlags.ERROR) {
      const errno = h.error || Errno.EIO;
      p.reject(new VfioUserError(errno, `${COMMAND_NAMES[h.command]} refused by the peer: ${errnoName(errno)}`));
    } else {
      p.resolve(frame);
    }
    return true;
  }

  /** The connection is gone: every outstanding request fails with `err`. */
  rejectAll(err: Error): void {
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
  }
}
