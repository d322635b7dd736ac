/**
 * Every CLI path behaves, tested on the real bin as a user runs it: usage
 * errors (one line, the command's --help, exit 2), --version, a closed
 * stdout (`serve | head -2`), Ctrl-C during the demo (says what it
 * interrupted, no servers or temp dirs left), snapshot refusals with their
 * reasons, `reset`, `devices`, --trace fields, and a device module from
 * outside the repository whose timers would keep `check` alive without
 * Device.dispose.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { VfioUserClient } from "../../src/client/client.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const CLI = path.join(ROOT, "src/cli/vfio-user-ts.mjs");
const VERSION = (JSON.parse(readFileSync(path.join(ROOT, "package.json"), "utf8")) as { version: string }).version;

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  out: string;
  err: string;
}

interface Proc {
  proc: ChildProcess;
  out(): string;
  err(): string;
  exit: Promise<Run>;
}

function start(args: string[], opts: { cwd?: string } = {}): Proc {
  const proc = spawn(process.execPath, [CLI, ...args], { cwd: opts.cwd ?? ROOT, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  proc.stdout!.on("data", (b: Buffer) => (out += b.toString()));
  proc.stderr!.on("data", (b: Buffer) => (err += b.toString()));
  const exit = new Promise<Run>((resolve) => proc.on("exit", (code, signal) => resolve({ code, signal, out, err })));
  return { proc, out: () => out, err: () => err, exit };
}

function run(args: string[], opts: { cwd?: string } = {}): Promise<Run> {
  return start(args, opts).exit;
}

async function until(what: string, cond: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), "vfu-cli-paths-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A server on a socket in `dir`, up. */
async function serve(name: string, args: string[] = []): Promise<{ p: Proc; socket: string; stop(): Promise<Run> }> {
  const socket = path.join(dir, `${name}.sock`);
  const p = start(["serve", "--socket", socket, "--log-format", "json", ...args]);
  await until(`${name} serving`, () => p.out().includes("vfio-user-ts: serving") && existsSync(socket));
  return {
    p,
    socket,
    stop: async () => {
      p.proc.kill("SIGTERM");
      return p.exit;
    },
  };
}

describe("usage errors and --version", () => {
  it("--version prints the package version", async () => {
    const r = await run(["--version"]);
    expect(r.code).toBe(0);
    expect(r.out.trim()).toBe(`vfio-user-ts ${VERSION} (Node ${process.version})`);
  });

  it.each([
    [[], "no command given", ""],
    [["frobnicate"], "unknown command 'frobnicate'", ""],
    [["serve"], "serve needs --socket PATH", "serve "],
    [["serve", "--socket", "/tmp/x.sock", "--frob"], "Unknown option '--frob'", "serve "],
    [["serve", "--socket", "/tmp/x.sock", "--device", "edu", "--opt", "dma-mask=abc"], "edu: dma-mask=abc: 'abc' is not an integer (decimal, or hex with 0x)", "serve "],
    [["serve", "--socket", "/tmp/x.sock", "--opt", "bogus=1"], "edu: unknown option 'bogus' (known: dma-mask)", "serve "],
    [["serve", "--socket", "/nonexistent-dir/x.sock"], "socket directory /nonexistent-dir does not exist", "serve "],
    [["devices", "extra"], "devices takes no arguments, got 'extra'", "devices "],
    [["demo"], "demo needs a name: 'demo migrate'", "demo migrate "],
    [["demo", "migrate", "--size", "abc"], "--size: 'abc' is not a size like 4096, 64K, 256M or 1G", "demo migrate "],
    [["demo", "migrate", "--size", "12K"], "bigmem: size=12K: 12K is not a power of two", "demo migrate "],
    [["demo", "migrate", "--max-rounds", "0"], "--max-rounds must be an integer of at least 1, got '0'", "demo migrate "],
    [["demo", "migrate", "--device", "counter", "--size", "4K"], "--size is bigmem's device memory; give your device's options with --opt", "demo migrate "],
    [["snapshot"], "snapshot needs 'save', 'restore' or 'inspect'", "snapshot "],
    [["snapshot", "save", "--file", "x"], "snapshot save needs --socket PATH", "snapshot "],
    [["reset"], "reset needs --socket PATH", "reset "],
    [["qemu"], "qemu needs --socket PATH (the socket 'vfio-user-ts serve' listens on)", "qemu "],
    [["qemu", "--socket", "/tmp/x.sock", "--mem", "lots"], "--mem: 'lots' is not a size like 4096, 64K, 256M or 1G", "qemu "],
    [["check", "--device", "./no-such-device.js"], "device module ./no-such-device.js does not exist", "check "],
  ])("%j: exit 2, one line, a pointer to --help", async (args, message, command) => {
    const r = await run(args);
    expect(r.code, r.err).toBe(2);
    expect(r.err).toBe(`vfio-user-ts: ${message}\nTry 'vfio-user-ts ${command}--help'.\n`);
    expect(r.out).toBe("");
  });

  it("devices lists each device's --opt keys with type and default", async () => {
    const r = await run(["devices"]);
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/^edu {2,}QEMU's edu/m);
    expect(r.out).toMatch(/--opt dma-mask {2}integer \(64-bit\), 1\.\.0xffffffffffffffff, default 0xfffffff/);
    expect(r.out).toMatch(/--opt size {2}size, power of two, 4K\.\.\S+, default 256M/);
    expect(r.out).toMatch(/--opt start {2}integer, 0\.\.4294967295, default 0/);
  });
});

describe("output and signals", () => {
  it("serve | head -2: a closed stdout (EPIPE) stops the server cleanly and removes its socket", async () => {
    // the reader is gone before the server writes its first line (head exits after two lines,
    // the server writes on: the same EPIPE, deterministically)
    const socket = path.join(dir, "head.sock");
    const p = start(["serve", "--socket", socket, "--log-format", "json"]);
    p.proc.stdout!.destroy();
    const r = await p.exit;
    expect(r.code, r.err).toBe(0);
    expect(r.signal).toBe(null);
    const shutdown = r.err.split("\n").filter((l) => l.includes('"msg":"shutting down"'));
    expect(shutdown.map((l) => JSON.parse(l) as Record<string, unknown>)).toMatchObject([{ reason: "stdout was closed", socket }]);
    expect(r.err).not.toMatch(/Error|EPIPE/);
    expect(existsSync(socket)).toBe(false);
  });

  it("serve | head -2 in a shell pipeline: two lines; the server stops on EPIPE or on Ctrl-C, the socket goes", async () => {
    const socket = path.join(dir, "pipeline.sock");
    const sh = spawn("sh", ["-c", `"${process.execPath}" "${CLI}" serve --socket "${socket}" --log-level warn | head -2`], { stdio: ["ignore", "pipe", "pipe"], detached: true });
    let out = "";
    let err = "";
    sh.stdout!.on("data", (b: Buffer) => (out += b.toString()));
    sh.stderr!.on("data", (b: Buffer) => (err += b.toString()));
    const exit = new Promise<number | null>((resolve) => sh.on("exit", (code) => resolve(code)));
    await until("head's two lines", () => out.split("\n").length >= 3, 20_000);
    expect(out).toBe(`vfio-user-ts: serving 'edu' on ${socket}\nAttach QEMU 11.1 or newer with:\n`);
    // whether the server's next line met a closed pipe depends on timing; if it is still serving, Ctrl-C
    await new Promise((r) => setTimeout(r, 200));
    try {
      process.kill(-sh.pid!, "SIGINT"); // the terminal's Ctrl-C goes to the whole pipeline
    } catch {
      // the pipeline is gone already: the server stopped on EPIPE
    }
    await exit;
    await until("the socket removed", () => !existsSync(socket), 10_000);
    expect(err).not.toMatch(/Error|EPIPE/);
  });

  it("SIGINT during demo migrate says what it interrupted, stops both servers, removes the temp dir", async () => {
    const p = start(["demo", "migrate", "--size", "512M", "--ram", "16M"]);
    await until("the servers", () => /sockets in (\S+)\)/.test(p.out()));
    const m = /servers: source pid (\d+), destination pid (\d+) \(sockets in (\S+)\)/.exec(p.out())!;
    const [src, dst, tmp] = [Number(m[1]), Number(m[2]), m[3]!];
    expect(existsSync(tmp)).toBe(true);
    p.proc.kill("SIGINT");
    const r = await p.exit;
    expect(r.code, r.out + r.err).toBe(130);
    expect(r.err).toMatch(/^vfio-user-ts: interrupted \(SIGINT\) while demo migrate \([^)]+\); stopping both servers and removing \S+; cleaning up$/m);
    expect(existsSync(tmp)).toBe(false);
    await until("servers gone", () => !alive(src) && !alive(dst), 10_000);
  }, 60_000);
});

describe("snapshot, reset", () => {
  let edu: Awaited<ReturnType<typeof serve>>;
  let counter: Awaited<ReturnType<typeof serve>>;
  let good: Buffer;
  const file = (name: string, bytes: Uint8Array) => {
    const f = path.join(dir, name);
    writeFileSync(f, bytes);
    return f;
  };

  beforeAll(async () => {
    edu = await serve("snap-edu");
    counter = await serve("snap-counter", ["--device", "counter"]);
    const saved = await run(["snapshot", "save", "--socket", edu.socket, "--file", path.join(dir, "edu.snap")]);
    expect(saved.code, saved.err).toBe(0);
    good = readFileSync(path.join(dir, "edu.snap"));
  }, 60_000);
  afterAll(async () => {
    await edu?.stop();
    await counter?.stop();
  });

  it("inspect tells what a good file holds", async () => {
    const r = await run(["snapshot", "inspect", "--file", path.join(dir, "edu.snap")]);
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/device 'edu' state version 1, 1 records, \d+ bytes, every CRC good/);
  });

  it.each([
    ["flipped.snap", () => Buffer.from(good).fill(good[200]! ^ 0xff, 200, 201), /is damaged: CRC mismatch in STATE record at offset \d+ \(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\) \(record 2, counting the HEADER as 1\)/],
    ["truncated.snap", () => good.subarray(0, good.length - 20), /is damaged: truncated inside STATE record at offset \d+ \(\d+ of \d+ payload bytes\) \(record 2/],
    ["no-end.snap", () => good.subarray(0, good.length - 9), /is damaged: truncated: no END record \(stream stops after \d+ bytes\) \(record 3/],
    ["empty.snap", () => Buffer.alloc(0), /empty\.snap is empty$/m],
    ["garbage.snap", () => Buffer.from("this is not a snapshot"), /is not a vfio-user-ts state stream \(bad magic 0x74686973/],
    ["trailing.snap", () => Buffer.concat([good, Buffer.from([0])]), /is damaged: 1 byte\(s\) after the END record at offset \d+/],
  ])("restore refuses %s with its reason, exit 1, the device untouched", async (name, make, reason) => {
    const f = file(name, make());
    const r = await run(["snapshot", "restore", "--socket", edu.socket, "--file", f]);
    expect(r.code, r.err).toBe(1);
    expect(r.err).toMatch(/^vfio-user-ts: snapshot restore: /);
    expect(r.err).toMatch(reason);
    expect(r.err.trim().split("\n")).toHaveLength(1);
  });

  it("a file for another device type is refused before anything is sent", async () => {
    const r = await run(["snapshot", "restore", "--socket", counter.socket, "--file", path.join(dir, "edu.snap")]);
    expect(r.code).toBe(1);
    expect(r.err).toContain(`holds state for 'edu' state version 1; the device at ${counter.socket} is 'counter' state version 1: nothing was sent, the device is RUNNING as before`);
  });

  it("--no-check sends the file anyway: the server refuses it (EINVAL) and the device is reset", async () => {
    const r = await run(["snapshot", "restore", "--socket", counter.socket, "--file", path.join(dir, "edu.snap"), "--no-check"]);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/the device refused .* \(EINVAL\): the stream is damaged or not for this device .*; the device was reset and is RUNNING in its power-on state/);
  });

  it("reset returns the device to its power-on state", async () => {
    const c = await VfioUserClient.connect(counter.socket);
    await c.negotiate();
    await c.writeU32(0, 0x04, 1234); // COUNT
    expect(await c.readU32(0, 0x04)).toBe(1234);
    c.close();
    await c.closedPromise;
    const reset = await run(["reset", "--socket", counter.socket]);
    expect(reset.code, reset.err).toBe(0);
    expect(reset.out.trim()).toBe(`reset the device at ${counter.socket}: power-on state (migration state RUNNING -> RUNNING)`);
    const d = await VfioUserClient.connect(counter.socket);
    await d.negotiate();
    expect(await d.readU32(0, 0x04)).toBe(0);
    d.close();
  });
});

describe("--trace", () => {
  it("logs each message's fields", async () => {
    const s = await serve("trace", ["--trace", "--device", "counter"]);
    const c = await VfioUserClient.connect(s.socket);
    await c.negotiate();
    await c.regionRead(0, 4, 4);
    c.close();
    await until("the trace line", () => s.p.err().includes('"cmd":"REGION_READ"'));
    await s.stop();
    const lines = s.p.err().split("\n").filter((l) => l.includes('"cmd":"REGION_READ"'));
    const recv = JSON.parse(lines.find((l) => l.includes('"msg":"recv"'))!) as Record<string, unknown>;
    expect(recv).toMatchObject({ cmd: "REGION_READ", region: 0, offset: "0x4", count: 4 });
    const send = JSON.parse(lines.find((l) => l.includes('"msg":"send"'))!) as Record<string, unknown>;
    expect(send).toMatchObject({ cmd: "REGION_READ", region: 0, offset: "0x4", count: 4, dataBytes: 4 });
  });
});

describe("a device module from outside the repository", () => {
  it("check exits by itself for a device with a timer (dispose clears it), and serve takes it by path", async () => {
    const devDir = mkdtempSync(path.join(tmpdir(), "vfu-outside-"));
    const api = pathToFileURL(path.join(ROOT, "src/index.ts")).href;
    writeFileSync(
      path.join(devDir, "ticker.mjs"),
      `import { defineOptions, parseOptions } from ${JSON.stringify(api)};
const options = defineOptions({ period: { type: "integer", min: 1, max: 1000, default: 5 } });
class Ticker {
  type = "ticker"; stateVersion = 1;
  identity = { vendorId: 0x1234, deviceId: 0x71c4, classCode: 0xff0000 };
  bars = [{ index: 0, size: 4096n, kind: "mem32", read: (o, d) => d.writeUInt32LE(o === 0 ? this.uptime >>> 0 : this.scratch), write: (o, d) => { if (o === 4 && d.length === 4) this.scratch = d.readUInt32LE(0); } }];
  // the timer keeps the process alive until dispose; uptime is not device state (not saved, not reset)
  uptime = 0; scratch = 0; timer = null;
  constructor(period) { this.period = period; }
  attach(ctx) { this.ctx = ctx; this.timer = setInterval(() => { if (this.ctx.running) this.uptime++; }, this.period); }
  reset() { this.scratch = 0; }
  saveState() { return { scratch: this.scratch }; }
  loadState(s) { this.scratch = s.scratch; }
  dispose() { clearInterval(this.timer); }
}
export default { name: "ticker", description: "counts timer ticks", options, create: (raw) => new Ticker(parseOptions("ticker", options, raw).period) };
`,
    );
    try {
      const t0 = performance.now();
      const c = start(["check", "--device", "./ticker.mjs", "--only", "reset", "--only", "state-roundtrip", "--opt", "period=2"], { cwd: devDir });
      // no hang: once it has printed its summary, check must exit by itself (the ticker's
      // setInterval would keep it alive without Device.dispose). A deadline well past any
      // exit, so a hang fails here with the output instead of at the test timeout.
      await until("check's summary", () => c.out().includes("passed,") || c.proc.exitCode !== null || c.proc.signalCode !== null, 40_000);
      const r = await Promise.race([c.exit, new Promise<null>((res) => setTimeout(() => res(null), 15_000).unref())]);
      if (r === null) {
        c.proc.kill("SIGKILL");
        throw new Error(`check printed its summary but had not exited 15 s later (a timer keeps it alive?)\n${c.out()}${c.err()}`);
      }
      console.log(`[cli] check --device ./ticker.mjs: exited ${(performance.now() - t0).toFixed(0)} ms after spawn`);
      expect(r.code, r.out + r.err).toBe(0);
      expect(r.signal).toBeNull();
      expect(r.out).toContain("vfio-user-ts check: device 'ticker', options period=2");
      expect(r.out).toContain("2 passed, 0 failed");
      const bad = await run(["check", "--device", "./ticker.mjs", "--opt", "period=0"], { cwd: devDir });
      expect(bad.err.split("\n")[0]).toBe("vfio-user-ts: ticker: period=0: 0 is out of range (1..1000)");
      const socket = path.join(devDir, "t.sock");
      const p = start(["serve", "--device", "./ticker.mjs", "--socket", socket], { cwd: devDir });
      await until("serving", () => p.out().includes("serving 'ticker'") && existsSync(socket) && statSync(socket).isSocket());
      p.proc.kill("SIGINT");
      expect((await p.exit).code).toBe(0);
      expect(existsSync(socket)).toBe(false);
    } finally {
      rmSync(devDir, { recursive: true, force: true });
    }
  }, 90_000);

  it("a module without a factory is a usage error that says what it exports", async () => {
    const devDir = mkdtempSync(path.join(tmpdir(), "vfu-outside-"));
    writeFileSync(path.join(devDir, "empty.mjs"), "export const notAFactory = 1;\n");
    try {
      const r = await run(["check", "--device", "./empty.mjs"], { cwd: devDir });
      expect(r.code).toBe(2);
      expect(r.err.split("\n")[0]).toBe(
        "vfio-user-ts: device module ./empty.mjs has no default export and no 'factory' export (it exports 'notAFactory'); export a DeviceFactory",
      );
    } finally {
      rmSync(devDir, { recursive: true, force: true });
    }
  });
});
