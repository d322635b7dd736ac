/**
 * QEMU from the command line, as a user runs it on this machine: the QEMU
 * command line `serve` prints is spawned exactly as printed (through sh)
 * and QEMU 11.1.3 attaches; `vfio-user-ts qemu --socket PATH` attaches to
 * sockets under /tmp and elsewhere (the root's bind mount); `--guest-kit`
 * boots Linux, which lists the device on its PCI bus and powers off when
 * its shell reads end of input. QEMU runs natively or from the trixie root
 * (docker/qemu-root.sh), whichever `vfio-user-ts qemu` picks here.
 *
 * Without QEMU these skip with the reason, or fail under VFIO_USER_REQUIRE_QEMU=1.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { qemuEnv, qemuRoot } from "../../src/cli/qemu.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const CLI = path.join(ROOT, "src/cli/vfio-user-ts.mjs");
const REQUIRE = process.env.VFIO_USER_REQUIRE_QEMU === "1";
const env = qemuEnv();
const why = env.mode === "none" ? env.why : "";
if (env.mode === "none" && REQUIRE) throw new Error(`QEMU unavailable (VFIO_USER_REQUIRE_QEMU=1): ${why}`);

interface Proc {
  proc: ChildProcess;
  out(): string;
  err(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const live: ChildProcess[] = [];

function start(file: string, args: string[], opts: { detached?: boolean } = {}): Proc {
  const proc = spawn(file, args, { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"], detached: opts.detached ?? false });
  live.push(proc);
  let out = "";
  let err = "";
  proc.stdout!.on("data", (b: Buffer) => (out += b.toString()));
  proc.stderr!.on("data", (b: Buffer) => (err += b.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on("exit", (code, signal) => resolve({ code, signal })));
  return { proc, out: () => out, err: () => err, exit };
}

async function until(what: string, cond: () => boolean, timeoutMs: number, detail: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\n${detail()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** `vfio-user-ts serve --trace` on `socket`, up. */
async function serve(socket: string, device = "edu"): Promise<Proc> {
  const s = start(process.execPath, [CLI, "serve", "--device", device, "--socket", socket, "--trace", "--log-format", "json"]);
  await until("the banner", () => s.out().includes("For a scripted guest") && existsSync(socket), 30_000, () => s.out() + s.err());
  return s;
}

/** QEMU's realize ends with DEVICE_RESET and BAR programming: it attached. */
const attached = (server: Proc) => server.err().includes('"cmd":"DEVICE_RESET"') && server.err().includes('"cmd":"DEVICE_GET_IRQ_INFO"');

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), "vfu-qemu-cli-"));
});
afterEach(() => {
  for (const p of live.splice(0)) {
    try {
      if (p.exitCode === null && p.signalCode === null) process.kill(p.spawnargs[0] === "sh" ? -p.pid! : p.pid!, "SIGKILL");
    } catch {
      // gone
    }
  }
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe.skipIf(env.mode === "none")(`QEMU from the CLI (${env.mode === "none" ? why : env.version})`, () => {
  it("the QEMU command line `serve` prints works exactly as printed", async () => {
    const socket = path.join(dir, "printed.sock");
    const server = await serve(socket);
    const printed = /^or by hand:\n\n([\s\S]+?\n  -device '[^\n]+')$/m.exec(server.out());
    expect(printed, server.out()).not.toBeNull();
    const line = printed![1]!;
    expect(line).toContain(`"path":"${env.mode === "root" && socket.startsWith(`${qemuRoot()}/`) ? socket.slice(qemuRoot().length) : socket}"`);
    const qemu = start("sh", ["-c", line], { detached: true });
    await until("QEMU attached", () => attached(server), 60_000, () => `QEMU: ${qemu.err()}\nserver: ${server.err().slice(-3000)}`);
    // QEMU's one warning about the device: no ERR interrupt (see the README)
    const warnings = qemu.err().split("\n").filter((l) => l.trim() !== "");
    expect(warnings.every((l) => l.includes("Could not enable error recovery for the device")), qemu.err()).toBe(true);
    process.kill(-qemu.proc.pid!, "SIGTERM");
    await qemu.exit;
    server.proc.kill("SIGTERM");
    expect((await server.exit).code).toBe(0);
  }, 120_000);

  it("vfio-user-ts qemu attaches to a socket outside /tmp (bind-mounted into the root) and cleans up on Ctrl-C", async () => {
    const other = mkdtempSync(path.join("/var/tmp", "vfu-qemu-cli-"));
    try {
      const socket = path.join(other, "edu.sock");
      const server = await serve(socket);
      if (env.mode === "root") expect(server.out()).toContain(`(QEMU runs chrooted in ${qemuRoot()} here and reaches only sockets under /tmp or ${qemuRoot()}/tmp by hand.)`);
      const dry = start(process.execPath, [CLI, "qemu", "--socket", socket, "--mem", "256M", "--dry-run"]);
      expect((await dry.exit).code).toBe(0);
      expect(dry.out()).toContain("memory-backend-memfd,id=mem,size=256M,share=on");
      const before = env.mode === "root" ? readdirSync(path.join(qemuRoot(), "tmp")).filter((f) => f.startsWith("vfio-user-qemu-")) : [];
      const q = start(process.execPath, [CLI, "qemu", "--socket", socket, "--mem", "256M"]);
      await until("QEMU attached", () => attached(server), 60_000, () => `qemu: ${q.out()}${q.err()}\nserver: ${server.err().slice(-3000)}`);
      expect(q.err()).toMatch(/^vfio-user-ts qemu: QEMU emulator version 11\.\d+\.\d+/m);
      q.proc.kill("SIGINT");
      const r = await q.exit;
      expect(r.code, q.err()).toBe(130);
      expect(q.err()).toContain("vfio-user-ts: interrupted (SIGINT) while running QEMU; cleaning up");
      if (env.mode === "root") expect(readdirSync(path.join(qemuRoot(), "tmp")).filter((f) => f.startsWith("vfio-user-qemu-"))).toEqual(before);
      server.proc.kill("SIGTERM");
      await server.exit;
    } finally {
      rmSync(other, { recursive: true, force: true });
    }
  }, 120_000);

  it("vfio-user-ts qemu without a server says so (exit 1)", async () => {
    const q = start(process.execPath, [CLI, "qemu", "--socket", path.join(dir, "nobody.sock")]);
    expect((await q.exit).code).toBe(1);
    expect(q.err()).toMatch(/^vfio-user-ts: no server socket at \S+nobody\.sock; start one first: vfio-user-ts serve --device NAME --socket /);
  });

  const kit = env.mode === "root" ? path.join(qemuRoot(), "opt/guest-kit") : "/var/cache/vfio-user-ts/guest-kit";
  const haveKit = existsSync(path.join(process.env.VFIO_USER_GUEST_KIT || kit, ".ready"));
  it.skipIf(!haveKit && !REQUIRE)("--guest-kit boots Linux, which finds the device on its PCI bus", async () => {
    const socket = path.join(dir, "kit.sock");
    const server = await serve(socket, "counter");
    const q = start(process.execPath, [CLI, "qemu", "--socket", socket, "--guest-kit"]);
    // stdin is not a terminal: the guest's shell reads end of input at once, then /init powers off
    const r = await q.exit;
    expect(r.code, q.out() + q.err()).toBe(0);
    expect(q.out()).toMatch(/vfio-user-ts guest: Linux 6\.\d+/);
    expect(q.out()).toMatch(/^ {2}\S+ {2}0x1234:0xc0de {2}0xff0000$/m);
    server.proc.kill("SIGTERM");
    await server.exit;
  }, 180_000);
});
