/**
 * Two connected in-memory transports for component tests: what one sends,
 * the other receives, with no socket in between.
 *
 * - Delivery is asynchronous (setImmediate, one event-loop turn like a real
 *   socket, and a request/reply loop cannot starve timers) and in order.
 *   Each send() arrives as one chunk: a fresh copy of the concatenated
 *   buffers, owned by the receiver.
 * - Fds are passed through as the same numbers, not duplicated: ownership
 *   moves to the receiver, so the sender must not close them (fake numbers
 *   work too, as long as nobody uses them as real fds).
 * - What one side sent and the other has not been handed yet counts as the
 *   sender's `queuedBytes` (with its high-water mark), as a socket's send
 *   queue would; delivery never blocks, so the pair is never congested.
 * - Data sent before start() is held until start(). Closing either end
 *   closes both: data already sent still reaches the other side, then both
 *   close handlers fire (once each, never synchronously inside close()).
 */
import type { Transport, TransportHandlers } from "./types.ts";

type Event = { kind: "data"; chunk: Buffer; fds: number[] } | { kind: "close" };

class MemoryTransport implements Transport {
  other!: MemoryTransport;
  readonly peer: string;
  private handlers: TransportHandlers | null = null;
  private _closed = false;
  /** close() was called on this side (not just the peer's). */
  private localClosed = false;
  private started = false;
  /** Events for this side, delivered in order once started. */
  private inbox: Event[] = [];
  private scheduled = false;
  /** Bytes this side sent that sit in the other side's inbox. */
  private queued = 0;
  private queuedMax = 0;

  constructor(name: string) {
    this.peer = `memory:${name}`;
  }

  get closed(): boolean {
    return this._closed;
  }

  /** Delivery is unbounded in memory: never congested. */
  readonly congested = false;

  get queuedBytes(): number {
    return this.queued;
  }

  get queuedHighWater(): number {
    return this.queuedMax;
  }

  start(handlers: TransportHandlers): void {
    if (this.started) throw new Error("MemoryTransport.start() called twice");
    this.started = true;
    this.handlers = handlers;
    this.schedule();
  }

  send(buffers: readonly Uint8Array[], fds?: readonly number[]): void {
    if (this._closed) return;
    const chunk = Buffer.concat(buffers as Uint8Array[]);
    if (chunk.length === 0 && (fds?.length ?? 0) === 0) return;
    this.queued += chunk.length;
    if (this.queued > this.queuedMax) this.queuedMax = this.queued;
    this.other.post({ kind: "data", chunk, fds: fds ? [...fds] : [] });
  }

  /** Data the other side sent left this side's inbox (delivered or dropped). */
  private taken(ev: Event): void {
    if (ev.kind === "data") this.other.queued -= ev.chunk.length;
  }

  close(): void {
    if (this._closed && this.localClosed) return;
    const wasClosed = this._closed;
    this._closed = true;
    this.localClosed = true;
    // Nothing is delivered to this side after its own close().
    for (const e of this.inbox) this.taken(e);
    this.inbox = this.inbox.filter((e) => e.kind === "close");
    if (!wasClosed) {
      this.post({ kind: "close" });
      this.other.peerClosed();
    }
  }

  /** The other end closed: after what it sent before, this end closes too. */
  private peerClosed(): void {
    if (this._closed) return;
    this._closed = true; // no more sends from this side
    this.post({ kind: "close" });
  }

  private post(ev: Event): void {
    this.inbox.push(ev);
    this.schedule();
  }

  private schedule(): void {
    if (this.scheduled || this.handlers === null || this.inbox.length === 0) return;
    this.scheduled = true;
    setImmediate(() => this.drain());
  }

  private drain(): void {
    this.scheduled = false;
    const handlers = this.handlers;
    if (handlers === null) return;
    while (this.inbox.length > 0) {
      const ev = this.inbox.shift()!;
      this.taken(ev);
      if (ev.kind === "close") {
        for (const e of this.inbox) this.taken(e);
        this.inbox.length = 0;
        this.handlers = null;
        handlers.close();
        return;
      }
      if (!this.localClosed) handlers.data(ev.chunk, ev.fds);
    }
  }
}

/** Two connected transports: [a, b]. */
export function createMemoryPair(): [Transport, Transport] {
  const a = new MemoryTransport("a");
  const b = new MemoryTransport("b");
  a.other = b;
  b.other = a;
  return [a, b];
}
