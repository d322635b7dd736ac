/**
 * A minimal QMP client: reads the greeting, negotiates capabilities, runs
 * commands (matched to replies by `id`, each with a deadline) and collects
 * asynchronous events.
 */
import type { Socket } from "node:net";
import { EventQueue } from "./event-queue.ts";

export interface QmpEvent {
  readonly event: string;
  readonly data: Record<string, unknown>;
  readonly timestamp: { seconds: number; microseconds: number } | undefined;
  /** Position in the connection's event list (0-based). */
  readonly seq: number;
}

export class QmpError extends Error {
  /** The QMP error class (e.g. `GenericError`, `CommandNotFound`), or "" for transport errors. */
  readonly errorClass: string;
  constructor(message: string, errorClass = "") {
    super(message);
    this.name = "QmpError";
    this.errorClass = errorClass;
  }
}

export interface QmpOptions {
  /** Deadline for a call that gives none (ms). Default 10 000. */
  timeoutMs?: number;
  /** Extra words for errors after the connection closed (e.g. QEMU's stderr). */
  describeClose?: () => string;
}

interface Pending {
  readonly cmd: string;
  resolve(v: unknown): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

export class Qmp {
  readonly timeoutMs: number;
  /** The `QMP` member of the greeting (version, capabilities). */
  greeting: Record<string, unknown> | undefined;
  private readonly socket: Socket;
  private readonly describeClose: () => string;
  private buf = "";
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private readonly events: QmpEvent[] = [];
  private readonly queue = new EventQueue<QmpEvent>();
  private closedReason: string | undefined;
  private greetingWaiter: { resolve(): void; reject(e: Error): void } | undefined;

  constructor(socket: Socket, opts: QmpOptions = {}) {
    this.socket = socket;
    this.timeoutMs = opts.timeoutMs ?? 10_000;
    this.describeClose = opts.describeClose ?? (() => "");
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("error", (err) => this.onClose(`socket error: ${err.message}`));
    socket.on("close", () => this.onClose("connection closed"));
  }

  get closed(): boolean {
    return this.closedReason !== undefined;
  }

  /** Wait for the greeting and leave capabilities-negotiation mode. */
  async handshake(timeoutMs = this.timeoutMs): Promise<void> {
    if (this.greeting === undefined) {
      await new Promise<void>((resolve, reject) => {
        if (this.closedReason !== undefined) {
          reject(new QmpError(`qmp: no greeting: ${this.closedReason}${this.closeDetail()}`));
          return;
        }
        const timer = setTimeout(() => {
          this.greetingWaiter = undefined;
          reject(new QmpError(`qmp: no greeting within ${timeoutMs} ms`));
        }, timeoutMs);
        this.greetingWaiter = {
          resolve: () => {
            clearTimeout(timer);
            resolve();
          },
          reject: (e) => {
            clearTimeout(timer);
            reject(e);
          },
        };
      });
    }
    await this.execute("qmp_capabilities", undefined, timeoutMs);
  }

  /** Run a command; resolves with its `return` member, rejects with QmpError on `error`. */
  execute<T = unknown>(cmd: string, args?: Record<string, unknown>, timeoutMs = this.timeoutMs): Promise<T> {
    if (this.closedReason !== undefined) {
      return Promise.reject(new QmpError(`qmp: ${cmd}: ${this.closedReason}${this.closeDetail()}`));
    }
    const id = `h${this.nextId++}`;
    const msg: Record<string, unknown> = { execute: cmd, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpError(`qmp: no reply to ${cmd} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { cmd, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(JSON.stringify(msg) + "\r\n");
    });
  }

  /** Every event seen on this connection, oldest first. */
  allEvents(): readonly QmpEvent[] {
    return this.events;
  }

  /**
   * Wait for an event named `name` (optionally matching `pred`). Earlier
   * events not yet returned by waitEvent count, oldest first; each event is
   * returned at most once.
   */
  waitEvent(name: string, timeoutMs = this.timeoutMs, pred?: (ev: QmpEvent) => boolean): Promise<QmpEvent> {
    return this.queue.wait(
      (ev) => ev.event === name && (pred === undefined || pred(ev)),
      timeoutMs,
      () => new QmpError(`qmp: no ${name} event within ${timeoutMs} ms`),
    );
  }

  close(): void {
    this.onClose("closed by the test");
    this.socket.destroy();
  }

  private closeDetail(): string {
    const d = this.describeClose();
    return d ? `\n${d}` : "";
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line !== "") this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // not JSON: ignore
    }
    if ("QMP" in msg) {
      this.greeting = msg.QMP as Record<string, unknown>;
      this.greetingWaiter?.resolve();
      this.greetingWaiter = undefined;
      return;
    }
    if (typeof msg.event === "string") {
      const ev: QmpEvent = {
        event: msg.event,
        data: (msg.data as Record<string, unknown> | undefined) ?? {},
        timestamp: msg.timestamp as QmpEvent["timestamp"],
        seq: this.events.length,
      };
      this.events.push(ev);
      this.queue.push(ev);
      return;
    }
    const id = typeof msg.id === "string" ? msg.id : undefined;
    if (id === undefined) return;
    const p = this.pending.get(id);
    if (p === undefined) return; // late reply to a timed-out command
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ("error" in msg) {
      const e = (msg.error ?? {}) as { class?: string; desc?: string };
      p.reject(new QmpError(`qmp: ${p.cmd}: ${e.class ?? "Error"}: ${e.desc ?? JSON.stringify(msg.error)}`, e.class ?? "Error"));
    } else {
      p.resolve(msg.return);
    }
  }

  private onClose(reason: string): void {
    if (this.closedReason !== undefined) return;
    this.closedReason = reason;
    const detail = this.closeDetail();
    this.greetingWaiter?.reject(new QmpError(`qmp: no greeting: ${reason}${detail}`));
    this.greetingWaiter = undefined;
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new QmpError(`qmp: ${p.cmd}: ${reason}${detail}`));
    }
  }
}
