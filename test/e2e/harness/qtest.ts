/**
 * A client for QEMU's qtest text protocol (the `-qtest` chardev of a machine
 * started with `accel=qtest`). The test plays the guest CPU: port I/O, memory
 * reads and writes (RAM and MMIO alike), the virtual clock, and interrupt
 * lines intercepted with `irq_intercept_in`.
 *
 * Wire format: one command per line; every command gets exactly one reply
 * line, in order, starting with `OK`, `FAIL` or `ERR`. Lines `IRQ raise N` /
 * `IRQ lower N` arrive at any time (also between a command and its reply)
 * once interrupts are intercepted.
 *
 * Requests are serialized: one is on the wire at a time, the others wait in a
 * queue. Every call has a deadline that covers its time in the queue; a call
 * whose reply is late is rejected, and the late reply, when it comes, is
 * dropped so later replies still match their commands.
 *
 * QEMU asserts on malformed arguments (it aborts), so this client checks
 * sizes and ranges before anything reaches the wire.
 */
import type { Socket } from "node:net";
import { EventQueue } from "./event-queue.ts";

export type Addr = bigint | number;

export interface IrqEvent {
  readonly kind: "raise" | "lower";
  readonly line: number;
  /** Position in the connection's IRQ event list (0-based). */
  readonly seq: number;
  /** performance.now() when the line was parsed. */
  readonly at: number;
}

export class QtestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "QtestError";
  }
}

export interface QtestOptions {
  /** Deadline for a call that gives none (ms). Default 10 000. */
  timeoutMs?: number;
  /** Extra words for errors after the connection closed (e.g. QEMU's stderr). */
  describeClose?: () => string;
}

interface Pending {
  readonly cmd: string;
  resolve(words: string): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout | undefined;
  /** Sent on the wire; its reply line is owed to us. */
  sent: boolean;
  /** Caller gave up (timeout): drop the reply when it comes. */
  abandoned: boolean;
}

const MAX_CHUNK = 1 << 20;

export class Qtest {
  readonly timeoutMs: number;
  private readonly socket: Socket;
  private readonly describeClose: () => string;
  private buf = "";
  /** Commands in wire order; the head may be in flight (sent=true). */
  private readonly queue: Pending[] = [];
  private closedReason: string | undefined;
  private readonly events: IrqEvent[] = [];
  /** Events not yet handed out by waitIrq. */
  private readonly irqQueue = new EventQueue<IrqEvent>();
  private readonly levels = new Map<number, boolean>();

  constructor(socket: Socket, opts: QtestOptions = {}) {
    this.socket = socket;
    this.timeoutMs = opts.timeoutMs ?? 10_000;
    this.describeClose = opts.describeClose ?? (() => "");
    socket.setEncoding("latin1");
    socket.setNoDelay?.(true);
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("error", (err) => this.onClose(`socket error: ${err.message}`));
    socket.on("close", () => this.onClose("connection closed"));
  }

  get closed(): boolean {
    return this.closedReason !== undefined;
  }

  // ---------------------------------------------------------------- raw

  /**
   * Send one command line and return the text after `OK` (trimmed). A `FAIL`
   * or `ERR` reply rejects with a QtestError.
   */
  command(cmd: string, timeoutMs = this.timeoutMs): Promise<string> {
    if (cmd.includes("\n")) return Promise.reject(new QtestError(`qtest: command contains a newline: ${JSON.stringify(cmd)}`));
    if (this.closedReason !== undefined) {
      return Promise.reject(new QtestError(`qtest: ${cmd.split(" ")[0]}: ${this.closedReason}${this.closeDetail()}`));
    }
    return new Promise<string>((resolve, reject) => {
      const p: Pending = { cmd, resolve, reject, timer: undefined, sent: false, abandoned: false };
      p.timer = setTimeout(() => this.onTimeout(p, timeoutMs), timeoutMs);
      this.queue.push(p);
      this.pump();
    });
  }

  // ---------------------------------------------------------------- port I/O

  async outb(port: number, value: number): Promise<void> {
    await this.command(`outb ${hexPort(port)} ${hexVal(value, 8)}`);
  }
  async outw(port: number, value: number): Promise<void> {
    await this.command(`outw ${hexPort(port)} ${hexVal(value, 16)}`);
  }
  async outl(port: number, value: number): Promise<void> {
    await this.command(`outl ${hexPort(port)} ${hexVal(value, 32)}`);
  }
  async inb(port: number): Promise<number> {
    return Number(parseValue("inb", await this.command(`inb ${hexPort(port)}`)));
  }
  async inw(port: number): Promise<number> {
    return Number(parseValue("inw", await this.command(`inw ${hexPort(port)}`)));
  }
  async inl(port: number): Promise<number> {
    return Number(parseValue("inl", await this.command(`inl ${hexPort(port)}`)));
  }

  // ---------------------------------------------------------------- memory

  async readb(addr: Addr): Promise<number> {
    return Number(parseValue("readb", await this.command(`readb ${hexAddr(addr)}`)));
  }
  async readw(addr: Addr): Promise<number> {
    return Number(parseValue("readw", await this.command(`readw ${hexAddr(addr)}`)));
  }
  async readl(addr: Addr): Promise<number> {
    return Number(parseValue("readl", await this.command(`readl ${hexAddr(addr)}`)));
  }
  async readq(addr: Addr): Promise<bigint> {
    return parseValue("readq", await this.command(`readq ${hexAddr(addr)}`));
  }
  async writeb(addr: Addr, value: number): Promise<void> {
    await this.command(`writeb ${hexAddr(addr)} ${hexVal(value, 8)}`);
  }
  async writew(addr: Addr, value: number): Promise<void> {
    await this.command(`writew ${hexAddr(addr)} ${hexVal(value, 16)}`);
  }
  async writel(addr: Addr, value: number): Promise<void> {
    await this.command(`writel ${hexAddr(addr)} ${hexVal(value, 32)}`);
  }
  async writeq(addr: Addr, value: bigint): Promise<void> {
    if (typeof value !== "bigint" || value < 0n || value > 0xffff_ffff_ffff_ffffn) {
      throw new RangeError(`qtest: writeq value ${String(value)} is not a u64 bigint`);
    }
    await this.command(`writeq ${hexAddr(addr)} 0x${value.toString(16)}`);
  }

  /** Read `len` bytes of guest physical memory (b64read, in 1 MiB pieces). */
  async read(addr: Addr, len: number): Promise<Buffer> {
    checkLen(len);
    const base = toAddr(addr);
    const parts: Buffer[] = [];
    for (let off = 0; off < len; off += MAX_CHUNK) {
      const n = Math.min(MAX_CHUNK, len - off);
      const reply = await this.command(`b64read ${hexAddr(base + BigInt(off))} 0x${n.toString(16)}`);
      const data = Buffer.from(reply, "base64");
      if (data.length !== n) throw new QtestError(`qtest: b64read returned ${data.length} bytes, wanted ${n}`);
      parts.push(data);
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts, len);
  }

  /** Write bytes to guest physical memory (b64write, in 1 MiB pieces). */
  async write(addr: Addr, data: Uint8Array): Promise<void> {
    const base = toAddr(addr);
    const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    for (let off = 0; off < buf.length; off += MAX_CHUNK) {
      const piece = buf.subarray(off, Math.min(buf.length, off + MAX_CHUNK));
      await this.command(`b64write ${hexAddr(base + BigInt(off))} 0x${piece.length.toString(16)} ${piece.toString("base64")}`);
    }
  }

  /** Fill `len` bytes of guest memory with `value`. */
  async memset(addr: Addr, len: number, value: number): Promise<void> {
    checkLen(len);
    if (len === 0) return;
    await this.command(`memset ${hexAddr(addr)} 0x${len.toString(16)} ${hexVal(value, 8)}`);
  }

  // ---------------------------------------------------------------- clock

  /**
   * Advance the virtual clock by `ns`, or (no argument) to the next timer
   * deadline. Returns the new clock value in ns. Under accel=qtest the clock
   * only moves when the test moves it. QEMU answers a step of 0 with `FAIL
   * could not advance time`.
   */
  async clockStep(ns?: bigint | number): Promise<bigint> {
    const cmd = ns === undefined ? "clock_step" : `clock_step ${toU64("clock_step ns", ns).toString()}`;
    return parseValue("clock_step", await this.command(cmd));
  }

  /** Set the virtual clock to `ns` (must not go backwards). Returns the new value. */
  async clockSet(ns: bigint | number): Promise<bigint> {
    return parseValue("clock_set", await this.command(`clock_set ${toU64("clock_set ns", ns).toString()}`));
  }

  // ---------------------------------------------------------------- interrupts

  /**
   * Intercept the GPIO inputs of the device at QOM `path` (e.g. `ioapic`):
   * from now on QEMU reports their level changes as `IRQ raise N` / `IRQ
   * lower N` lines instead of delivering them. QEMU allows one intercepted
   * device per machine.
   */
  async irqInterceptIn(path: string): Promise<void> {
    await this.command(`irq_intercept_in ${checkWord("path", path)}`);
  }

  /** Intercept the GPIO outputs of the device at QOM `path`. */
  async irqInterceptOut(path: string): Promise<void> {
    await this.command(`irq_intercept_out ${checkWord("path", path)}`);
  }

  /** Drive GPIO input `num` of named group `name` ("unnamed" for none) on `path`. */
  async setIrqIn(path: string, name: string, num: number, level: number): Promise<void> {
    await this.command(`set_irq_in ${checkWord("path", path)} ${checkWord("name", name)} ${num | 0} ${level | 0}`);
  }

  /** Every IRQ line seen on this connection, oldest first. */
  irqEvents(): readonly IrqEvent[] {
    return this.events;
  }

  /** The level of intercepted line `line` as last reported (false if never raised). */
  irqState(line: number): boolean {
    return this.levels.get(line) ?? false;
  }

  /** Forget IRQ events seen so far (levels are kept). */
  clearIrqEvents(): void {
    this.irqQueue.clear();
  }

  /**
   * Wait for an `IRQ <kind> <line>` event. Events that arrived earlier and
   * were not yet returned by waitIrq count (oldest first), so a raise that
   * beat the call is not missed; each event is returned at most once.
   */
  waitIrq(kind: "raise" | "lower", line: number, timeoutMs = this.timeoutMs): Promise<IrqEvent> {
    return this.irqQueue.wait(
      (ev) => ev.kind === kind && ev.line === line,
      timeoutMs,
      () => {
        const seen = this.events.slice(-8).map((e) => `${e.kind} ${e.line}`).join(", ") || "none";
        return new QtestError(`qtest: no IRQ ${kind} ${line} within ${timeoutMs} ms (level now ${this.irqState(line) ? "high" : "low"}; last events: ${seen})`);
      },
    );
  }

  // ---------------------------------------------------------------- lifecycle

  /** Close the connection; pending and later calls reject. */
  close(): void {
    this.onClose("closed by the test");
    this.socket.destroy();
  }

  // ---------------------------------------------------------------- internals

  private closeDetail(): string {
    const d = this.describeClose();
    return d ? `\n${d}` : "";
  }

  private pump(): void {
    const head = this.queue[0];
    if (head === undefined || head.sent || this.closedReason !== undefined) return;
    head.sent = true;
    this.socket.write(head.cmd + "\n");
  }

  private onTimeout(p: Pending, timeoutMs: number): void {
    p.timer = undefined;
    const verb = p.cmd.split(" ")[0];
    if (p.sent) {
      // Keep it at the head: its reply is still owed and must be skipped.
      p.abandoned = true;
      p.reject(new QtestError(`qtest: no reply to '${shorten(p.cmd)}' within ${timeoutMs} ms`));
    } else {
      const i = this.queue.indexOf(p);
      if (i >= 0) this.queue.splice(i, 1);
      p.reject(new QtestError(`qtest: '${verb}' still queued after ${timeoutMs} ms (an earlier command has not been answered)`));
    }
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl).replace(/\r$/, "");
      this.buf = this.buf.slice(nl + 1);
      this.onLine(line);
    }
  }

  private onLine(line: string): void {
    if (line.startsWith("IRQ ")) {
      const m = /^IRQ (raise|lower) (-?\d+)$/.exec(line);
      if (m) {
        const ev: IrqEvent = { kind: m[1] as "raise" | "lower", line: Number(m[2]), seq: this.events.length, at: performance.now() };
        this.events.push(ev);
        this.levels.set(ev.line, ev.kind === "raise");
        this.irqQueue.push(ev);
        return;
      }
    }
    const head = this.queue[0];
    if (head === undefined || !head.sent) {
      // Nothing owed: QEMU said something unprompted. Not fatal; ignore.
      return;
    }
    this.queue.shift();
    if (head.timer) clearTimeout(head.timer);
    if (!head.abandoned) {
      if (line === "OK" || line.startsWith("OK ")) {
        head.resolve(line.slice(2).trim());
      } else {
        head.reject(new QtestError(`qtest: '${shorten(head.cmd)}' failed: ${line}`));
      }
    }
    this.pump();
  }

  private onClose(reason: string): void {
    if (this.closedReason !== undefined) return;
    this.closedReason = reason;
    const detail = this.closeDetail();
    for (const p of this.queue.splice(0)) {
      if (p.timer) clearTimeout(p.timer);
      if (!p.abandoned) p.reject(new QtestError(`qtest: '${shorten(p.cmd)}': ${reason}${detail}`));
    }
  }
}

// -------------------------------------------------------------------- helpers

function shorten(cmd: string): string {
  return cmd.length > 80 ? cmd.slice(0, 77) + "..." : cmd;
}

function toAddr(addr: Addr): bigint {
  if (typeof addr === "bigint") {
    if (addr < 0n || addr > 0xffff_ffff_ffff_ffffn) throw new RangeError(`qtest: address ${addr} out of range`);
    return addr;
  }
  if (!Number.isSafeInteger(addr) || addr < 0) throw new RangeError(`qtest: address ${addr} is not a non-negative safe integer`);
  return BigInt(addr);
}

function hexAddr(addr: Addr): string {
  return "0x" + toAddr(addr).toString(16);
}

function hexPort(port: number): string {
  if (!Number.isInteger(port) || port < 0 || port > 0xffff) throw new RangeError(`qtest: port ${port} out of range`);
  return "0x" + port.toString(16);
}

function hexVal(value: number, bits: 8 | 16 | 32): string {
  const max = bits === 32 ? 0xffff_ffff : (1 << bits) - 1;
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new RangeError(`qtest: value ${value} does not fit in ${bits} bits`);
  }
  return "0x" + value.toString(16);
}

function toU64(what: string, v: bigint | number): bigint {
  const b = typeof v === "bigint" ? v : Number.isSafeInteger(v) ? BigInt(v) : -1n;
  if (b < 0n || b > 0xffff_ffff_ffff_ffffn) throw new RangeError(`qtest: ${what} ${String(v)} is not a u64`);
  return b;
}

function checkLen(len: number): void {
  if (!Number.isSafeInteger(len) || len < 0) throw new RangeError(`qtest: length ${len} is not a non-negative integer`);
}

function checkWord(what: string, s: string): string {
  if (s === "" || /\s/.test(s)) throw new RangeError(`qtest: ${what} ${JSON.stringify(s)} must be one non-empty word`);
  return s;
}

function parseValue(cmd: string, rest: string): bigint {
  const word = rest.split(/\s+/)[0] ?? "";
  try {
    if (word === "") throw new Error("empty");
    return BigInt(word);
  } catch {
    throw new QtestError(`qtest: ${cmd}: cannot parse reply value ${JSON.stringify(rest)}`);
  }
}
