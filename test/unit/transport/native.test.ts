import { spawnSync } from "node:child_process";
import fs from "node:fs";
import { constants as osConstants } from "node:os";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { native } from "../../../src/transport/native.ts";

const { EAGAIN, EBADF, ENOENT, ENAMETOOLONG, ECONNREFUSED } = osConstants.errno;
const ADDON = fileURLToPath(new URL("../../../src/transport/native/build/Release/vfio_native.node", import.meta.url));

let dir: string;
const toClose: number[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vfio-native-"));
});

afterEach(() => {
  for (const fd of toClose.splice(0)) native.close(fd);
  fs.rmSync(dir, { recursive: true, force: true });
});

function track(fd: number): number {
  expect(fd).toBeGreaterThanOrEqual(0);
  toClose.push(fd);
  return fd;
}

/** A connected pair of raw fds: [client, server]. */
function rawPair(): [number, number] {
  const p = path.join(dir, "raw.sock");
  const l = track(native.listen(p, 4));
  const c = track(native.connect(p));
  const s = track(native.accept(l));
  return [c, s];
}

function openFdCount(): number {
  return fs.readdirSync("/proc/self/fd").length;
}

function runChild(script: string, args: string[] = []): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [...args, "-e", script], {
    env: { ...process.env, ADDON },
    encoding: "utf8",
    timeout: 20_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe("native addon: errno convention and arguments", () => {
  it("returns -errno instead of throwing for syscall failures", () => {
    expect(native.close(-1)).toBe(-EBADF);
    expect(native.connect(path.join(dir, "missing.sock"))).toBe(-ENOENT);
    expect(native.listen(path.join(dir, "x".repeat(200)), 1)).toBe(-ENAMETOOLONG);
    expect(native.accept(-1)).toBe(-EBADF);
    expect(native.dup(-1)).toBe(-EBADF);
    expect(native.fstatSize(-1)).toBe(-BigInt(EBADF));
    expect(native.mmap(-1, 0n, 4096, false)).toBe(-EBADF);
    const l = track(native.listen(path.join(dir, "a.sock"), 1));
    expect(native.accept(l)).toBe(-EAGAIN);
  });

  it("throws TypeError for wrong argument types", () => {
    expect(() => native.close("3" as unknown as number)).toThrow(TypeError);
    expect(() => native.listen(5 as unknown as string, 1)).toThrow(TypeError);
    expect(() => native.recv(0, [] as unknown as Buffer, new Int32Array(254))).toThrow(TypeError);
    expect(() => native.recv(0, Buffer.alloc(4), new Uint32Array(254) as unknown as Int32Array)).toThrow(TypeError);
    expect(() => native.send(0, [1] as unknown as Buffer[], null)).toThrow(TypeError);
    expect(() => native.memfdCreate("x", -1n)).toThrow(TypeError);
    expect(() => native.munmap(new ArrayBuffer(8))).toThrow(TypeError);
  });

  it("a connect to a socket file nobody listens on is ECONNREFUSED, also non-blocking", () => {
    const p = path.join(dir, "stale.sock");
    native.close(native.listen(p, 1));
    expect(native.connect(p)).toBe(-ECONNREFUSED);
    expect(native.connect(p, true)).toBe(-ECONNREFUSED);
  });

  it("memfdCreate sizes the file; eventfd is non-blocking", () => {
    const m = track(native.memfdCreate("sz", 12345n));
    expect(native.fstatSize(m)).toBe(12345n);
    const e = track(native.eventfd(0, 0));
    expect(() => fs.readSync(e, Buffer.alloc(8), 0, 8, null)).toThrow(expect.objectContaining({ code: "EAGAIN" }));
  });
});

describe("native addon: recv/send", () => {
  it("carries several fds in one message", () => {
    const [c, s] = rawPair();
    const fds = [track(native.eventfd(0, 0)), track(native.eventfd(0, 0)), track(native.memfdCreate("m", 10n))];
    expect(native.send(c, [Buffer.from("abc"), Buffer.from("def")], Int32Array.from(fds))).toBe(6);
    const buf = Buffer.alloc(64);
    const out = new Int32Array(1 + native.MAX_FDS);
    expect(native.recv(s, buf, out)).toBe(6);
    expect(buf.subarray(0, 6).toString()).toBe("abcdef");
    expect(out[0]).toBe(3);
    const got = Array.from(out.subarray(1, 4));
    for (const fd of got) track(fd);
    expect(native.fstatSize(got[2]!)).toBe(10n);
    expect(native.recv(s, buf, out)).toBe(-EAGAIN);
  });

  it("reports lost fds (MSG_CTRUNC) as fdsOut[0] = -1 and closes the ones that arrived", () => {
    const [c, s] = rawPair();
    const fds = [track(native.eventfd(0, 0)), track(native.eventfd(0, 0))];
    expect(native.send(c, [Buffer.from("xy")], Int32Array.from(fds))).toBe(2);
    const before = openFdCount();
    const out = new Int32Array(2); // room for one fd only
    expect(native.recv(s, Buffer.alloc(16), out)).toBe(2);
    expect(out[0]).toBe(-1);
    expect(openFdCount()).toBe(before);
  });

  it("returns short sends and -EAGAIN on a full socket, and 0 at EOF", () => {
    const [c, s] = rawPair();
    const big = Buffer.alloc(8 << 20);
    const n = native.send(c, [big], null);
    expect(n).toBeGreaterThan(0);
    expect(n).toBeLessThan(big.length);
    expect(native.send(c, [big], null)).toBe(-EAGAIN);
    native.close(toClose.splice(toClose.indexOf(c), 1)[0]!);
    const buf = Buffer.alloc(1 << 20);
    const out = new Int32Array(254);
    let total = 0;
    for (;;) {
      const r = native.recv(s, buf, out);
      expect(r).toBeGreaterThanOrEqual(0);
      if (r === 0) break;
      total += r;
    }
    expect(total).toBe(n);
  });
});

describe("native addon: mmap", () => {
  it("munmap detaches the ArrayBuffer (views become empty) and is idempotent", () => {
    const fd = track(native.memfdCreate("map", 8192n));
    fs.writeSync(fd, Buffer.from("hello"), 0, 5, 100);
    const ab = native.mmap(fd, 100n, 5000n, true);
    expect(ab).toBeInstanceOf(ArrayBuffer);
    const view = Buffer.from(ab as ArrayBuffer);
    expect(view.length).toBe(5000);
    expect(view.subarray(0, 5).toString()).toBe("hello");
    expect(native.munmap(ab as ArrayBuffer)).toBe(0);
    expect((ab as ArrayBuffer).byteLength).toBe(0);
    expect(view.length).toBe(0);
    expect(() => view.readUInt8(0)).toThrow(RangeError);
    expect(native.munmap(ab as ArrayBuffer)).toBe(0);
  });

  it("finalizes mappings that were never unmapped (run with --expose-gc)", () => {
    const r = runChild(
      `const n = require(process.env.ADDON);
       const fd = n.memfdCreate("gc", 1n << 20n);
       for (let i = 0; i < 2000; i++) { const ab = n.mmap(fd, 0n, 1 << 20, true); new Uint8Array(ab)[0] = i & 255; }
       global.gc();
       setTimeout(() => { global.gc(); setTimeout(() => {
         const maps = require("fs").readFileSync("/proc/self/maps", "utf8").split("\\n").filter((l) => l.includes("memfd:gc")).length;
         console.log("maps=" + maps); }, 50); }, 50);`,
      ["--expose-gc"],
    );
    expect(r.stderr).toBe("");
    const maps = Number(/maps=(\d+)/.exec(r.stdout)![1]);
    expect(maps).toBeLessThan(2000);
  });
});

describe("native addon: Watcher", () => {
  it("reports readiness and can be closed from inside its callback", async () => {
    const efd = track(native.eventfd(1, 0)); // stays readable: level-triggered
    let calls = 0;
    let lastEvents = 0;
    const w = new native.Watcher(efd, (events, status) => {
      calls++;
      lastEvents = events;
      expect(status).toBe(0);
      w.close();
      w.close(); // idempotent
    });
    expect(w.start(native.READABLE)).toBe(0);
    await new Promise((r) => setTimeout(r, 50));
    expect(calls).toBe(1);
    expect(lastEvents & native.READABLE).toBe(native.READABLE);
    expect(w.start(native.READABLE)).toBe(-EBADF);
  });

  it("stop() and start() with WRITABLE", async () => {
    const efd = track(native.eventfd(0, 0));
    let calls = 0;
    const w = new native.Watcher(efd, (events) => {
      calls++;
      expect(events & native.WRITABLE).toBe(native.WRITABLE);
      w.stop();
    });
    w.start(native.READABLE | native.WRITABLE);
    await new Promise((r) => setTimeout(r, 50));
    expect(calls).toBe(1);
    w.close();
  });

  it("runs microtasks queued by the callback before the next I/O callback", async () => {
    const efd = track(native.eventfd(1, 0));
    const order: string[] = [];
    let n = 0;
    const w = new native.Watcher(efd, () => {
      const k = n++;
      order.push(`cb${k}`);
      queueMicrotask(() => order.push(`micro${k}`));
      if (n === 2) w.close();
    });
    w.start(native.READABLE);
    await new Promise((r) => setTimeout(r, 50));
    expect(order).toEqual(["cb0", "micro0", "cb1", "micro1"]);
  });

  it("surfaces an exception thrown by the callback as an uncaught exception", () => {
    const handled = runChild(
      `const n = require(process.env.ADDON);
       process.on("uncaughtException", (e) => { console.log("caught:" + e.message); process.exit(0); });
       const fd = n.eventfd(1, 0);
       const w = new n.Watcher(fd, () => { w.close(); throw new Error("boom from callback"); });
       w.start(n.READABLE);`,
    );
    expect(handled.stdout).toContain("caught:boom from callback");
    expect(handled.status).toBe(0);

    const unhandled = runChild(
      `const n = require(process.env.ADDON);
       const fd = n.eventfd(1, 0);
       const w = new n.Watcher(fd, () => { w.close(); throw new Error("boom unhandled"); });
       w.start(n.READABLE);`,
    );
    expect(unhandled.status).not.toBe(0);
    expect(unhandled.stderr).toContain("boom unhandled");
  });

  it("survives garbage collection of stopped and never-closed watchers", () => {
    const r = runChild(
      `const n = require(process.env.ADDON);
       const fd = n.eventfd(0, 0);
       for (let i = 0; i < 5000; i++) { const w = new n.Watcher(fd, () => {}); if (i % 2) { w.start(n.READABLE); w.stop(); } }
       global.gc();
       setTimeout(() => { global.gc(); setTimeout(() => console.log("ok"), 20); }, 20);`,
      ["--expose-gc"],
    );
    expect(r.stderr).toBe("");
    expect(r.stdout.trim()).toBe("ok");
    expect(r.status).toBe(0);
  });

  it("a started watcher keeps the process alive until closed; unref() does not", () => {
    const r = runChild(
      `const n = require(process.env.ADDON);
       const fd = n.eventfd(0, 0);
       const w = new n.Watcher(fd, () => { console.log("fired"); w.close(); });
       w.start(n.READABLE);
       setTimeout(() => require("fs").writeSync(fd, Buffer.from([1,0,0,0,0,0,0,0])), 30);
       const u = new n.Watcher(n.eventfd(0, 0), () => {}); u.start(n.READABLE); u.unref();`,
    );
    expect(r.stdout.trim()).toBe("fired");
    expect(r.status).toBe(0);
  });

  it("throws when the fd cannot be polled", () => {
    expect(() => new native.Watcher(-1, () => {})).toThrow(expect.objectContaining({ code: "EBADF" }));
  });
});
