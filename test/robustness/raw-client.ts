/**
 * Helpers for the robustness suites and the fuzzer: a raw vfio-user client
 * that can send anything (well-formed or not) over a real UNIX socket, an
 * in-process server with a log capture, a child-process server (with its
 * own accounting and V8 figures on request), and probes of a process's open
 * fds and RSS (RSS for printing, not for asserting).
 *
 * Deliberately independent of src/client/: it speaks the wire through the
 * protocol/ codecs only, so a client bug cannot hide a server bug.
 */
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { pino, type Logger } from "pino";
import { EduDevice } from "../../devices/edu/edu.ts";
import {
  COMMAND_NAMES,
  Command,
  HEADER_SIZE,
  HeaderFlags,
  PROTOCOL_MAJOR,
  PROTOCOL_MINOR,
  RegionIndex,
  encodeHeader,
  encodeRegionReadRequest,
  encodeVersion,
  FrameDecoder,
  U32_MAX,
  type Frame,
  type Header,
} from "../../protocol/index.ts";
import { native } from "../../src/transport/native.ts";
import { UnixConnection } from "../../src/transport/unix-socket.ts";
import { VfioUserServer, type ServerOptions, type ServerStats } from "../../src/server/server.ts";
import type { ServerLimits } from "../../src/server/session.ts";
import type { Device } from "../../src/device/api.ts";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const CHILD_SERVER = path.join(ROOT, "test/fuzz/server-child.ts");
export const CLI = path.join(ROOT, "src/cli/vfio-user-ts.mjs");

// ---------------------------------------------------------------- raw client

export interface SendOptions {
  fds?: readonly number[];
  msgId?: number;
  /** Header flags (default: a command). */
  flags?: number;
  /** Header error field (reserved in a command). */
  error?: number;
  /** Lie about the size in the header. */
  size?: number;
}

/** A client that sends bytes as told and collects what comes back. */
export class RawClient {
  readonly conn: UnixConnection;
  /** Replies not claimed yet, by msgId. */
  private readonly replies = new Map<number, Frame>();
  /** Commands the server sent us (DMA_READ / DMA_WRITE), in order. */
  readonly serverRequests: Frame[] = [];
  private readonly decoder: FrameDecoder;
  private waiters: (() => void)[] = [];
  private nextId = 1;
  closed = false;
  closeErr: Error | undefined;
  /** The server sent something our decoder refused. */
  protocolError: Error | undefined;
  /** Called for server-to-client commands; default: answer DMA_READ with zeros, DMA_WRITE with an empty ack. */
  onServerRequest: ((frame: Frame) => void) | null = null;

  private constructor(conn: UnixConnection) {
    this.conn = conn;
    this.decoder = new FrameDecoder({
      maxFrameSize: U32_MAX,
      onFrame: (f) => this.onFrame(f),
    });
    conn.start({
      data: (chunk, fds) => {
        for (const fd of fds) native.close(fd); // the server never sends us fds
        if (this.protocolError) return;
        try {
          this.decoder.push(chunk);
        } catch (err) {
          this.protocolError = err as Error;
        }
        this.poke();
      },
      close: (err) => {
        this.closed = true;
        this.closeErr = err;
        this.poke();
      },
    });
  }

  static connect(socketPath: string): RawClient {
    return new RawClient(UnixConnection.connect(socketPath));
  }

  /** Connects and negotiates VERSION (asserting success). */
  static async ready(socketPath: string, caps: object = { capabilities: { max_msg_fds: 16, max_data_xfer_size: 1048576 } }): Promise<RawClient> {
    const c = RawClient.connect(socketPath);
    const r = await c.request(Command.VERSION, versionBody(caps));
    if (r.header.error !== 0) throw new Error(`VERSION refused: errno ${r.header.error}`);
    return c;
  }

  private onFrame(f: Frame): void {
    // copy: the body may be a view of a chunk we do not keep
    const frame: Frame = { header: f.header, body: Buffer.from(f.body), fds: [] };
    if ((f.header.flags & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_REPLY) {
      this.replies.set(f.header.msgId, frame);
      return;
    }
    this.serverRequests.push(frame);
    if (this.onServerRequest) this.onServerRequest(frame);
    else this.defaultServerRequest(frame);
  }

  private defaultServerRequest(f: Frame): void {
    const h = f.header;
    if (h.command === Command.DMA_READ) {
      const count = Number(f.body.readBigUInt64LE(8));
      const body = Buffer.alloc(16 + count);
      f.body.copy(body, 0, 0, 16);
      this.sendRaw(frameBytes({ msgId: h.msgId, command: h.command, flags: HeaderFlags.TYPE_REPLY, error: 0 }, body));
    } else if (h.command === Command.DMA_WRITE) {
      this.sendRaw(frameBytes({ msgId: h.msgId, command: h.command, flags: HeaderFlags.TYPE_REPLY, error: 0 }, Buffer.alloc(0)));
    }
  }

  private poke(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Resolves when pred() holds; rejects after timeoutMs. */
  until(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
    if (pred()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
      const check = (): void => {
        if (pred()) {
          clearTimeout(timer);
          resolve();
        } else {
          this.waiters.push(check);
        }
      };
      this.waiters.push(check);
    });
  }

  allocId(): number {
    const id = this.nextId;
    this.nextId = (this.nextId + 1) & 0xffff;
    return id;
  }

  /** Sends bytes as they are (one sendmsg; fds on the first byte). */
  sendRaw(bytes: Uint8Array | readonly Uint8Array[], fds?: readonly number[]): void {
    const parts = bytes instanceof Uint8Array ? [bytes] : bytes;
    this.conn.send(parts, fds);
  }

  /** Sends a command (or whatever the options make of it); returns its msgId. */
  send(command: number, body: Uint8Array = Buffer.alloc(0), opts: SendOptions = {}): number {
    const msgId = opts.msgId ?? this.allocId();
    const h: Header = {
      msgId,
      command,
      size: opts.size ?? HEADER_SIZE + body.length,
      flags: opts.flags ?? HeaderFlags.TYPE_COMMAND,
      error: opts.error ?? 0,
    };
    this.sendRaw([encodeHeader(h), body], opts.fds);
    return msgId;
  }

  /** The reply to msgId. */
  async reply(msgId: number, timeoutMs = 5000): Promise<Frame> {
    await this.until(() => this.replies.has(msgId) || this.closed || this.protocolError !== undefined, timeoutMs, `reply to msgId ${msgId}`);
    const r = this.replies.get(msgId);
    if (!r) {
      if (this.protocolError) throw this.protocolError;
      throw new Error(`connection closed before the reply to msgId ${msgId}${this.closeErr ? `: ${this.closeErr.message}` : ""}`);
    }
    this.replies.delete(msgId);
    return r;
  }

  async request(command: number, body: Uint8Array = Buffer.alloc(0), opts: SendOptions = {}, timeoutMs = 5000): Promise<Frame> {
    return this.reply(this.send(command, body, opts), timeoutMs);
  }

  /** Sends and returns the errno of the reply (0 for success), checking the reply header's shape. */
  async errno(command: number, body: Uint8Array = Buffer.alloc(0), opts: SendOptions = {}): Promise<number> {
    const r = await this.request(command, body, opts);
    const h = r.header;
    if (h.command !== command) throw new Error(`reply carries command ${h.command}, sent ${command}`);
    const isErr = (h.flags & HeaderFlags.ERROR) !== 0;
    if (isErr !== (h.error !== 0)) throw new Error(`reply Error flag ${isErr} but error field ${h.error}`);
    // spec: an error reply is the header alone
    if (isErr && r.body.length !== 0) throw new Error(`error reply with a ${r.body.length}-byte body`);
    return h.error;
  }

  /** True when a reply for msgId arrived (without waiting). */
  hasReply(msgId: number): boolean {
    return this.replies.has(msgId);
  }

  get pendingReplies(): number {
    return this.replies.size;
  }

  waitClosed(timeoutMs = 5000): Promise<void> {
    return this.until(() => this.closed, timeoutMs, "the server to close the connection");
  }

  /** REGION_READ of the config-space vendor id. */
  async vendorId(): Promise<number> {
    const r = await this.request(Command.REGION_READ, encodeRegionReadRequest({ region: RegionIndex.CONFIG, offset: 0n, count: 2 }));
    if (r.header.error !== 0) throw new Error(`vendor id read refused: errno ${r.header.error}`);
    return r.body.readUInt16LE(16);
  }

  /** REGION_READ of `count` bytes; throws on an error reply. */
  async read(region: number, offset: bigint, count: number): Promise<Buffer> {
    const r = await this.request(Command.REGION_READ, encodeRegionReadRequest({ region, offset, count }));
    if (r.header.error !== 0) throw new Error(`REGION_READ refused: errno ${r.header.error}`);
    return r.body.subarray(16);
  }

  /** REGION_WRITE; throws on an error reply. */
  async write(region: number, offset: bigint, data: Uint8Array): Promise<void> {
    const body = Buffer.alloc(16 + data.length);
    body.writeBigUInt64LE(offset, 0);
    body.writeUInt32LE(region, 8);
    body.writeUInt32LE(data.length, 12);
    body.set(data, 16);
    const e = await this.errno(Command.REGION_WRITE, body);
    if (e !== 0) throw new Error(`REGION_WRITE refused: errno ${e}`);
  }

  close(): void {
    this.conn.close();
  }
}

export function versionBody(caps: object | string = { capabilities: { max_msg_fds: 16, max_data_xfer_size: 1048576 } }): Buffer {
  return encodeVersion({ major: PROTOCOL_MAJOR, minor: PROTOCOL_MINOR, data: typeof caps === "string" ? caps : JSON.stringify(caps) });
}

/** One frame as bytes: header (size computed unless given) and body. */
export function frameBytes(h: Omit<Header, "size"> & { size?: number }, body: Uint8Array = Buffer.alloc(0)): Buffer {
  const head = encodeHeader({ ...h, size: h.size ?? HEADER_SIZE + body.length });
  return Buffer.concat([head, body]);
}

export function commandName(cmd: number): string {
  return COMMAND_NAMES[cmd] ?? `cmd ${cmd}`;
}

// ------------------------------------------------------- in-process server

export interface LogLine {
  level: number;
  msg: string;
  [k: string]: unknown;
}

export interface InProcessServer {
  server: VfioUserServer;
  socketPath: string;
  dir: string;
  logs: LogLine[];
  device: Device;
  stop(): void;
}

/** A capturing pino logger: every line parsed into `lines`. */
export function captureLogger(level: string, lines: LogLine[]): Logger {
  return pino(
    { level, base: undefined },
    {
      write(s: string): void {
        lines.push(JSON.parse(s) as LogLine);
      },
    },
  );
}

export function tmpDir(prefix = "vfu-robust-"): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function startInProcessServer(
  opts: { limits?: Partial<ServerLimits>; device?: Device; logLevel?: string; dirPrefix?: string; server?: Pick<ServerOptions, "conformance" | "faults"> } = {},
): InProcessServer {
  const dir = tmpDir(opts.dirPrefix);
  const socketPath = path.join(dir, "s.sock");
  const logs: LogLine[] = [];
  const device = opts.device ?? new EduDevice();
  const server = new VfioUserServer({ device, log: captureLogger(opts.logLevel ?? "debug", logs), limits: opts.limits, ...opts.server });
  server.listen(socketPath);
  return {
    server,
    socketPath,
    dir,
    logs,
    device,
    stop() {
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

// ------------------------------------------------------------ process probes

/** Open fds of a process (by /proc/PID/fd). */
export function fdCount(pid: number | "self" = "self"): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/** What each open fd of a process points to. */
export function fdTargets(pid: number | "self" = "self"): string[] {
  const out: string[] = [];
  for (const name of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      out.push(fs.readlinkSync(`/proc/${pid}/fd/${name}`));
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

/** Resident set size of a process in bytes (VmRSS). */
export function rssOf(pid: number): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  const m = /VmRSS:\s+(\d+) kB/.exec(status);
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]) * 1024;
}

/** Memory mappings of a process that come from memfds named `name`. */
export function memfdMappings(pid: number | "self", name: string): number {
  return fs
    .readFileSync(`/proc/${pid}/maps`, "utf8")
    .split("\n")
    .filter((l) => l.includes(`/memfd:${name}`)).length;
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls until pred() holds; throws after timeoutMs, saying what it waited for. */
export async function waitUntil(pred: () => boolean, what: string, timeoutMs = 2000, stepMs = 5): Promise<void> {
  if (!(await eventually(pred, timeoutMs, stepMs))) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

/** Polls until pred() holds or the time is up; returns whether it held (the caller asserts it). */
export async function eventually(pred: () => boolean, timeoutMs = 2000, stepMs = 5): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (pred()) return true;
    if (Date.now() > end) return false;
    await sleep(stepMs);
  }
}

/** A memfd of `size` bytes named `name` (the caller closes it). */
export function memfd(name: string, size: bigint): number {
  const fd = native.memfdCreate(name, size);
  if (fd < 0) throw new Error(`memfd_create failed: ${fd}`);
  return fd;
}

export function eventfd(): number {
  const fd = native.eventfd(0, 0);
  if (fd < 0) throw new Error(`eventfd failed: ${fd}`);
  return fd;
}

// ------------------------------------------------------ child-process server

export interface ChildServerOptions {
  device?: string;
  deviceOpts?: string[];
  maxDmaMaps?: number;
  maxDataXferSize?: number;
  logLevel?: string;
  logFile?: string;
  socketPath?: string;
}

/**
 * A server in its own process (test/fuzz/server-child.ts): crashes and hangs
 * cannot take the test runner down, and its fds and RSS are its own.
 */
export class ChildServer {
  readonly dir: string;
  readonly socketPath: string;
  readonly proc: ChildProcess;
  exitCode: number | null = null;
  exitSignal: NodeJS.Signals | null = null;
  exited = false;
  private stdoutBuf = "";
  private lineWaiters: ((line: string) => boolean)[] = [];
  private readonly exitPromise: Promise<void>;
  stderrTail = "";

  private constructor(opts: ChildServerOptions) {
    this.dir = tmpDir("vfu-child-");
    this.socketPath = opts.socketPath ?? path.join(this.dir, "s.sock");
    const args = ["--expose-gc", "--import", "tsx", CHILD_SERVER, "--socket", this.socketPath];
    if (opts.device) args.push("--device", opts.device);
    for (const o of opts.deviceOpts ?? []) args.push("--opt", o);
    if (opts.maxDmaMaps !== undefined) args.push("--max-dma-maps", String(opts.maxDmaMaps));
    if (opts.maxDataXferSize !== undefined) args.push("--max-data-xfer-size", String(opts.maxDataXferSize));
    args.push("--log-level", opts.logLevel ?? "silent");
    if (opts.logFile) args.push("--log-file", opts.logFile);
    this.proc = spawn(process.execPath, args, { cwd: ROOT, stdio: ["pipe", "pipe", "pipe"] });
    this.proc.stdout!.setEncoding("utf8");
    this.proc.stdout!.on("data", (s: string) => {
      this.stdoutBuf += s;
      let nl;
      while ((nl = this.stdoutBuf.indexOf("\n")) >= 0) {
        const line = this.stdoutBuf.slice(0, nl);
        this.stdoutBuf = this.stdoutBuf.slice(nl + 1);
        this.lineWaiters = this.lineWaiters.filter((w) => !w(line));
      }
    });
    this.proc.stderr!.setEncoding("utf8");
    this.proc.stderr!.on("data", (s: string) => {
      this.stderrTail = (this.stderrTail + s).slice(-4000);
    });
    this.exitPromise = new Promise((resolve) => {
      this.proc.on("exit", (code, signal) => {
        this.exited = true;
        this.exitCode = code;
        this.exitSignal = signal;
        for (const w of this.lineWaiters) w("");
        this.lineWaiters = [];
        resolve();
      });
    });
  }

  static async start(opts: ChildServerOptions = {}, timeoutMs = 20_000): Promise<ChildServer> {
    const c = new ChildServer(opts);
    await c.waitLine((l) => l.startsWith("READY"), timeoutMs, "READY");
    return c;
  }

  get pid(): number {
    return this.proc.pid!;
  }

  private waitLine(pred: (line: string) => boolean, timeoutMs: number, what: string): Promise<string> {
    return new Promise((resolve, reject) => {
      if (this.exited) {
        reject(new Error(`server exited (code ${this.exitCode}, signal ${this.exitSignal}) before ${what}: ${this.stderrTail}`));
        return;
      }
      const timer = setTimeout(() => reject(new Error(`server: no ${what} within ${timeoutMs} ms: ${this.stderrTail}`)), timeoutMs);
      this.lineWaiters.push((line) => {
        if (this.exited && line === "") {
          clearTimeout(timer);
          reject(new Error(`server exited (code ${this.exitCode}, signal ${this.exitSignal}) before ${what}: ${this.stderrTail}`));
          return true;
        }
        if (!pred(line)) return false;
        clearTimeout(timer);
        resolve(line);
        return true;
      });
    });
  }

  /**
   * Runs a full GC in the server; V8's heap figures after it (what tests
   * bound), and its RSS from /proc (for printing only: it measures the
   * allocator's high-water marks as much as the server).
   */
  async gcStats(timeoutMs = 10_000): Promise<{ rss: number; heapUsed: number; external: number; arrayBuffers: number }> {
    const wait = this.waitLine((l) => l.startsWith("GC "), timeoutMs, "GC reply");
    this.proc.stdin!.write("gc\n");
    const [, , heapUsed, external, arrayBuffers] = (await wait).split(" ").map(Number);
    return { rss: rssOf(this.pid), heapUsed: heapUsed!, external: external!, arrayBuffers: arrayBuffers! };
  }

  /** The server's own accounting (VfioUserServer.stats()): high-water marks over all connections so far. */
  async serverStats(timeoutMs = 10_000): Promise<ServerStats> {
    const wait = this.waitLine((l) => l.startsWith("STATS "), timeoutMs, "STATS reply");
    this.proc.stdin!.write("stats\n");
    const [, decoderHighWater, sendQueueHighWater, resumeBufferHighWater] = (await wait).split(" ").map(Number);
    return { decoderHighWater: decoderHighWater!, sendQueueHighWater: sendQueueHighWater!, resumeBufferHighWater: resumeBufferHighWater! };
  }

  fds(): number {
    return fdCount(this.pid);
  }

  fdTargets(): string[] {
    return fdTargets(this.pid);
  }

  rss(): number {
    return rssOf(this.pid);
  }

  async kill(signal: NodeJS.Signals = "SIGTERM", timeoutMs = 10_000): Promise<void> {
    if (!this.exited) this.proc.kill(signal);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.exitPromise, new Promise<void>((r) => (timer = setTimeout(r, timeoutMs)))]);
    clearTimeout(timer);
    if (!this.exited) {
      this.proc.kill("SIGKILL");
      await this.exitPromise;
    }
  }

  waitExit(): Promise<void> {
    return this.exitPromise;
  }

  async stop(): Promise<void> {
    await this.kill("SIGTERM");
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A fresh connection does VERSION + REGION_READ of the vendor id; resolves to it or rejects. */
export async function healthProbe(socketPath: string, timeoutMs = 5000): Promise<number> {
  const c = RawClient.connect(socketPath);
  try {
    const v = await c.request(Command.VERSION, versionBody(), {}, timeoutMs);
    if (v.header.error !== 0) throw new Error(`probe: VERSION refused with errno ${v.header.error}`);
    const r = await c.request(Command.REGION_READ, encodeRegionReadRequest({ region: RegionIndex.CONFIG, offset: 0n, count: 2 }), {}, timeoutMs);
    if (r.header.error !== 0) throw new Error(`probe: REGION_READ refused with errno ${r.header.error}`);
    return r.body.readUInt16LE(16);
  } finally {
    c.close();
  }
}

// ------------------------------------------------------------- body builder

/** Little-endian body builder: `le().u32(32).u64(0n).buf`. */
export class Le {
  private readonly parts: Buffer[] = [];
  u8(v: number): this {
    const b = Buffer.alloc(1);
    b.writeUInt8(v);
    this.parts.push(b);
    return this;
  }
  u16(v: number): this {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(v);
    this.parts.push(b);
    return this;
  }
  u32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v >>> 0);
    this.parts.push(b);
    return this;
  }
  s32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeInt32LE(v);
    this.parts.push(b);
    return this;
  }
  u64(v: bigint | number): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(v)));
    this.parts.push(b);
    return this;
  }
  bytes(v: Uint8Array | number): this {
    this.parts.push(typeof v === "number" ? Buffer.alloc(v) : Buffer.from(v));
    return this;
  }
  get buf(): Buffer {
    return Buffer.concat(this.parts);
  }
}

export function le(): Le {
  return new Le();
}

// ------------------------------------------------------------ deaf client

/**
 * A client on a bare socket that sends and never reads: what the server
 * sends piles up on its side (socket buffers, then its own send queue).
 */
export class DeafClient {
  readonly fd: number;
  private nextId = 1;

  constructor(socketPath: string) {
    const fd = native.connect(socketPath);
    if (fd < 0) throw new Error(`connect failed: ${fd}`);
    this.fd = fd;
  }

  /** Sends one frame; returns false when the socket would block. */
  send(command: number, body: Uint8Array, fds?: readonly number[]): boolean {
    const h = encodeHeader({ msgId: this.nextId++ & 0xffff, command, size: HEADER_SIZE + body.length, flags: HeaderFlags.TYPE_COMMAND, error: 0 });
    const total = h.length + body.length;
    let sent = 0;
    for (let tries = 0; sent < total && tries < 1000; tries++) {
      const parts = sent < h.length ? [h.subarray(sent), body] : [body.subarray(sent - h.length)];
      const n = native.send(this.fd, parts, sent === 0 && fds ? Int32Array.from(fds) : null);
      if (n < 0) {
        if (sent === 0) return false;
        continue; // mid-frame: retry (non-blocking socket)
      }
      sent += n;
    }
    return sent === total;
  }

  close(): void {
    native.close(this.fd);
  }
}
