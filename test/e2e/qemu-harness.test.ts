/**
 * The QEMU harness itself, without any vfio-user device: QEMU 11.1.3 (q35,
 * accel=qtest) in the trixie root, qtest and QMP clients, PCI config helpers,
 * teardown. Emulated devices (edu, virtio-rng-pci, the q35 AHCI) stand in
 * where a test needs BARs or an interrupt.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createServer, connect, type Server, type Socket } from "node:net";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describeQemu } from "./harness/describe-qemu.ts";
import { findProcesses, startQemu, type QemuInstance } from "./harness/qemu.ts";
import { makeSharedDir, qemuAvailable, qemuMode, toGuestPath, type SharedDir } from "./harness/shared-dir.ts";
import { Qtest, QtestError } from "./harness/qtest.ts";
import { QmpError } from "./harness/qmp.ts";
import * as pci from "./harness/pci.ts";

/** A reaped or zombie process counts as gone. */
function gone(pid: number): boolean {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, "latin1");
    const state = s.slice(s.lastIndexOf(")") + 2, s.lastIndexOf(")") + 3);
    return state === "Z" || state === "X";
  } catch {
    return true;
  }
}

describeQemu("QEMU harness: bare q35 machine with memfd RAM", () => {
  let dir: SharedDir;
  let q: QemuInstance;

  beforeAll(async () => {
    dir = makeSharedDir();
    q = await startQemu({ dir });
    const v = qemuAvailable();
    console.log(`[e2e] ${v.ok ? v.version : "?"}: connected ${q.connectMs.toFixed(1)} ms, ready (first qtest reply) ${q.realizeMs.toFixed(1)} ms after spawn`);
  });

  afterAll(async () => {
    await q?.stop();
    dir?.cleanup();
  });

  it("shares the directory between host and QEMU (chroot: same inode, path minus the root; native: same path)", () => {
    expect(toGuestPath(join(dir.host, "x.sock"))).toBe(`${dir.guest}/x.sock`);
    if (qemuMode() === "chroot") {
      expect(dir.host.endsWith(dir.guest)).toBe(true);
      expect(dir.guest).toMatch(/^\/tmp\/vfu-/);
      expect(() => toGuestPath("/etc/passwd")).toThrow(/outside the QEMU root/);
    } else {
      expect(dir.guest).toBe(dir.host);
      expect(toGuestPath("/etc/passwd")).toBe("/etc/passwd");
    }
    expect(q.args).toContain("memory-backend=mem");
  });

  it("reads the host bridge 00:00.0 (8086:29c0) through 0xcf8/0xcfc", async () => {
    const hb = pci.bdf(0, 0, 0);
    expect(await pci.cfgRead16(q.qtest, hb, pci.PCI_VENDOR_ID)).toBe(0x8086);
    expect(await pci.cfgRead16(q.qtest, hb, pci.PCI_DEVICE_ID)).toBe(0x29c0);
    expect(await pci.cfgRead32(q.qtest, hb, 0)).toBe(0x29c0_8086);
    expect(await pci.cfgRead8(q.qtest, hb, 0x0b)).toBe(0x06); // class: bridge
    expect(await pci.findDevice(q.qtest, 0x8086, 0x29c0)).toBe(hb);
    expect(await pci.findDevice(q.qtest, 0x1234, 0x5678)).toBeNull();
    const fns = (await pci.listDevices(q.qtest)).map((f) => pci.formatBdf(f.bdf));
    expect(fns).toEqual(["00:00.0", "00:1f.0", "00:1f.2", "00:1f.3"]);
  });

  it("keeps concurrent config accesses from interleaving", async () => {
    const hb = pci.bdf(0, 0, 0);
    const lpc = pci.bdf(0, 0x1f, 0);
    const got = await Promise.all([
      pci.cfgRead16(q.qtest, hb, 2),
      pci.cfgRead16(q.qtest, lpc, 2),
      pci.cfgRead16(q.qtest, hb, 2),
      pci.cfgRead16(q.qtest, lpc, 2),
    ]);
    expect(got).toEqual([0x29c0, 0x2918, 0x29c0, 0x2918]);
  });

  it("writes and reads guest RAM", async () => {
    const qt = q.qtest;
    await qt.writel(0x100000n, 0xdeadbeef);
    expect(await qt.readl(0x100000n)).toBe(0xdeadbeef);
    expect(await qt.readb(0x100000n)).toBe(0xef);
    expect(await qt.readw(0x100002n)).toBe(0xdead);
    await qt.writeq(0x100008n, 0x0123_4567_89ab_cdefn);
    expect(await qt.readq(0x100008n)).toBe(0x0123_4567_89ab_cdefn);
    await qt.writeb(0x100010n, 0xaa);
    await qt.writew(0x100012n, 0xbbcc);
    expect(await qt.read(0x100010n, 4)).toEqual(Buffer.from([0xaa, 0x00, 0xcc, 0xbb]));

    const big = Buffer.alloc(3 * 1024 * 1024 + 123); // crosses the 1 MiB chunking
    for (let i = 0; i < big.length; i++) big[i] = (i * 7 + (i >> 11)) & 0xff;
    await qt.write(0x200000n, big);
    expect((await qt.read(0x200000n, big.length)).equals(big)).toBe(true);

    await qt.memset(0x200000n, 4096, 0x5a);
    expect((await qt.read(0x200000n, 4096)).every((b) => b === 0x5a)).toBe(true);
    expect(await qt.read(0x200000n, 0)).toHaveLength(0);
  });

  it("rejects bad replies and bad arguments clearly", async () => {
    await expect(q.qtest.command("no_such_command")).rejects.toThrow(/failed: FAIL Unknown command/);
    await expect(q.qtest.writeb(0n, 0x100)).rejects.toThrow(RangeError);
    await expect(q.qtest.outl(0x10000, 0)).rejects.toThrow(RangeError);
    // the connection is still in step afterwards
    expect(await q.qtest.command("endianness")).toBe("little");
  });

  it("answers QMP", async () => {
    expect(q.qmp.greeting).toMatchObject({ version: { qemu: { major: 11 } } });
    const status = await q.qmp.execute<{ status: string; running: boolean }>("query-status");
    expect(status).toMatchObject({ status: "running", running: true });
    const memdevs = await q.qmp.execute<{ id: string; size: number; share: boolean }[]>("query-memdev");
    expect(memdevs).toEqual([expect.objectContaining({ id: "mem", size: 256 * 1024 * 1024, share: true })]);
    await expect(q.qmp.execute("no-such-command")).rejects.toThrow(QmpError);
    await expect(q.qmp.execute("no-such-command")).rejects.toMatchObject({ errorClass: "CommandNotFound" });
  });

  it("steps the virtual clock", async () => {
    const t0 = await q.qtest.clockStep(1);
    const t1 = await q.qtest.clockStep(1_000_000);
    expect(t1 - t0).toBe(1_000_000n);
    await expect(q.qtest.clockStep(0)).rejects.toThrow(/could not advance time/); // QEMU refuses a 0 step
    expect(await q.qtest.clockSet(t1 + 5n)).toBe(t1 + 5n);
  });

  it("stop() kills QEMU and leaves no process behind", async () => {
    const own = makeSharedDir();
    try {
      const q2 = await startQemu({ dir: own, memfd: false, memMiB: 128 });
      const pid = q2.proc.pid!;
      expect(findProcesses(own.guest).map((p) => p.pid)).toEqual([pid]);
      // the spawned pid is QEMU itself (the launcher execs all the way down)
      expect(findProcesses(own.guest)[0]!.cmdline).toMatch(/^qemu-system-x86_64 /);
      const memdevs = await q2.qmp.execute<{ id: string; share: boolean }[]>("query-memdev");
      expect(memdevs[0]).toMatchObject({ share: false });
      const exit = await q2.stop();
      expect(exit).toEqual({ code: 0, signal: null }); // SIGTERM is a clean shutdown
      expect(gone(pid)).toBe(true);
      expect(findProcesses(own.guest)).toEqual([]);
      await expect(q2.qtest.readb(0n)).rejects.toThrow(QtestError);
      expect(await q2.stop()).toEqual(exit); // idempotent
    } finally {
      own.cleanup();
    }
  });
});

describeQemu("QEMU harness: PCI helpers and interrupts with emulated devices", () => {
  let dir: SharedDir;
  let q: QemuInstance;

  beforeAll(async () => {
    dir = makeSharedDir();
    // edu (1234:11e8): 1 MiB 32-bit BAR0, INTx; virtio-rng-pci: 64-bit BAR4
    q = await startQemu({ dir, extraArgs: ["-device", "edu,addr=4.0", "-device", "virtio-rng-pci,addr=5.0"] });
  });

  afterAll(async () => {
    await q?.stop();
    dir?.cleanup();
  });

  it("sizes, assigns and enables 32- and 64-bit BARs in the documented windows", async () => {
    const qt = q.qtest;
    const edu = await pci.findDevice(qt, 0x1234, 0x11e8);
    const rng = await pci.findDevice(qt, 0x1af4, 0x1005);
    expect(edu).toBe(pci.bdf(0, 4, 0));
    expect(rng).toBe(pci.bdf(0, 5, 0));

    expect(await pci.readBar(qt, edu!, 0)).toEqual({ kind: "mem32", prefetchable: false, address: 0n });
    expect(await pci.barSize(qt, edu!, 0)).toBe(0x100000n);
    expect(await pci.barSize(qt, edu!, 1)).toBe(0n);
    expect(await pci.readBar(qt, rng!, 4)).toMatchObject({ kind: "mem64", prefetchable: true });
    expect(await pci.barSize(qt, rng!, 4)).toBe(0x4000n);
    expect(await pci.barSize(qt, rng!, 0)).toBe(0x20n); // I/O BAR
    // sizing restored the BARs
    expect((await pci.readBar(qt, edu!, 0)).address).toBe(0n);

    const alloc = new pci.BarAllocator();
    const eduBars = await pci.assignAllBars(qt, edu!, alloc);
    const rngBars = await pci.assignAllBars(qt, rng!, alloc);
    const e0 = eduBars.get(0)!.address;
    const r4 = rngBars.get(4)!.address;
    expect(e0).toBe(pci.PCI_MMIO32_BASE);
    expect(r4).toBe(pci.PCI_MMIO64_BASE);
    expect(rngBars.get(1)!.address).toBeGreaterThanOrEqual(e0 + 0x100000n);
    expect((await pci.readBar(qt, rng!, 4)).address).toBe(r4);

    // not decoded before the memory bit is set
    expect(await qt.readl(e0)).not.toBe(0x010000ed);
    const cmd = await pci.enableDevice(qt, edu!, { memory: true, busMaster: true });
    expect(cmd & 0x6).toBe(0x6);
    await pci.enableDevice(qt, rng!);

    expect(await qt.readl(e0)).toBe(0x010000ed); // edu identification
    await qt.writel(e0 + 4n, 0x12345678);
    expect(await qt.readl(e0 + 4n)).toBe(~0x12345678 >>> 0); // liveness check inverts
    // virtio common config in the 64-bit BAR above 4 GiB: feature word 1 has VERSION_1
    await qt.writel(r4, 1);
    expect((await qt.readl(r4 + 4n)) & 1).toBe(1);

    // the q35 AHCI's 32-bit ABAR in the same window
    const ahci = (await pci.findDevice(qt, 0x8086, 0x2922))!;
    expect(await pci.barSize(qt, ahci, 5)).toBe(0x1000n);
    const abar = alloc.alloc32(0x1000n);
    await pci.assignBar(qt, ahci, 5, abar);
    await pci.enableDevice(qt, ahci, { memory: true });
    expect(await qt.readl(abar + 0x10n)).toBe(0x00010000); // AHCI 1.0
  });

  it("finds capabilities", async () => {
    const rng = pci.bdf(0, 5, 0);
    const msix = await pci.findCapability(q.qtest, rng, 0x11);
    expect(msix).not.toBeNull();
    expect((await pci.cfgRead8(q.qtest, rng, msix!)) & 0xff).toBe(0x11);
    expect(await pci.findCapability(q.qtest, pci.bdf(0, 0, 0), 0x11)).toBeNull();
  });

  it("reports intercepted INTx as IRQ raise/lower events", async () => {
    const qt = q.qtest;
    const edu = pci.bdf(0, 4, 0);
    const e0 = (await pci.readBar(qt, edu, 0)).address;
    expect(await pci.cfgRead8(qt, edu, pci.PCI_INTERRUPT_PIN)).toBe(1);
    await qt.irqInterceptIn("ioapic");
    expect(qt.irqState(20)).toBe(false);
    await qt.writel(e0 + 0x60n, 1); // edu: raise interrupt
    const up = await qt.waitIrq("raise", 20, 30_000); // slot 4, INTA -> GSI 20
    expect(up).toMatchObject({ kind: "raise", line: 20 });
    expect(qt.irqState(20)).toBe(true);
    await qt.writel(e0 + 0x64n, 1); // edu: acknowledge
    await qt.waitIrq("lower", 20, 30_000);
    expect(qt.irqState(20)).toBe(false);
    await expect(qt.waitIrq("raise", 20, 50)).rejects.toThrow(/no IRQ raise 20 within 50 ms/);
  });
});

describeQemu("QEMU harness: startup failures and teardown", () => {
  let dir: SharedDir;
  beforeAll(() => {
    dir = makeSharedDir();
  });
  afterAll(() => dir?.cleanup());

  it("measures startup of the bare machine", async () => {
    const times: number[] = [];
    for (let i = 0; i < 3; i++) {
      const q = await startQemu({ dir });
      times.push(q.realizeMs);
      await q.stop();
    }
    times.sort((a, b) => a - b);
    console.log(`[e2e] bare q35 spawn -> qtest ready: ${times.map((t) => t.toFixed(1)).join(", ")} ms`);
    expect(findProcesses(dir.guest)).toEqual([]);
  });

  it("rejects with QEMU's stderr when the vfio-user server is not there", async () => {
    const sock = join(dir.host, "nobody-listens.sock");
    const err = await startQemu({ dir, vfioUserSocket: sock }).then(
      () => null,
      (e: Error) => e,
    );
    expect(err).toBeInstanceOf(Error);
    expect(err!.message).toMatch(/QEMU exited with code 1/);
    expect(err!.message).toContain("vfio-user-pci");
    expect(err!.message).toContain(toGuestPath(sock));
    expect(findProcesses(dir.guest)).toEqual([]);
    expect(existsSync(join(dir.host, "nobody-listens.sock"))).toBe(false);
  });

  it("rejects with QEMU's stderr on a bad command line", async () => {
    await expect(startQemu({ dir, extraArgs: ["-device", "no-such-device"] })).rejects.toThrow(/'no-such-device' is not a valid device model name/);
  });

  it("SIGKILLs a QEMU that does not stop on SIGTERM", async () => {
    const q = await startQemu({ dir });
    const pid = q.proc.pid!;
    q.proc.kill("SIGSTOP"); // a stopped process cannot act on SIGTERM
    const t0 = performance.now();
    const exit = await q.stop(300);
    expect(exit.signal).toBe("SIGKILL");
    expect(performance.now() - t0).toBeGreaterThanOrEqual(250);
    expect(gone(pid)).toBe(true);
    expect(findProcesses(dir.guest)).toEqual([]);
  });

  it("reports QEMU's exit to pending calls", async () => {
    const q = await startQemu({ dir });
    const pending = q.qmp.execute("quit").catch(() => undefined);
    const exit = await q.exited;
    await pending;
    expect(exit.code).toBe(0);
    await expect(q.qtest.readl(0n)).rejects.toThrow(/connection closed[\s\S]*QEMU exited with code 0/);
    await q.stop();
  });
});

describe("qtest client protocol (scripted peer, no QEMU)", () => {
  let tmp: string;
  let server: Server;
  let peer: Socket;
  let qt: Qtest;
  const received: string[] = [];

  beforeAll(async () => {
    tmp = mkdtempSync(join(tmpdir(), "qtest-proto-"));
    const path = join(tmp, "s");
    const accepted = new Promise<Socket>((resolve) => {
      server = createServer(resolve);
    });
    await new Promise<void>((resolve) => server.listen(path, resolve));
    const client = connect(path);
    peer = await accepted;
    peer.setEncoding("latin1");
    let buf = "";
    peer.on("data", (d: string) => {
      buf += d;
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        received.push(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
      }
    });
    qt = new Qtest(client, { timeoutMs: 200 });
  });

  afterAll(() => {
    qt?.close();
    peer?.destroy();
    server?.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  const tick = () => new Promise((r) => setTimeout(r, 20));

  it("sends one request at a time and matches replies in order, IRQ lines aside", async () => {
    received.length = 0;
    const a = qt.readl(0x1000n);
    const b = qt.inb(0x60);
    await tick();
    expect(received).toEqual(["readl 0x1000"]); // b waits its turn
    peer.write("IRQ raise 5\nOK 0x0000000012345678\n");
    expect(await a).toBe(0x12345678);
    await tick();
    expect(received).toEqual(["readl 0x1000", "inb 0x60"]);
    peer.write("OK 0x00ab\n");
    expect(await b).toBe(0xab);
    expect(qt.irqState(5)).toBe(true);
    expect(await qt.waitIrq("raise", 5, 10)).toMatchObject({ line: 5, seq: 0 }); // arrived before the wait
  });

  it("times out, then drops the late reply so later calls stay in step", async () => {
    received.length = 0;
    const slow = qt.readq(0x2000n);
    const queued = qt.readb(0x3000n);
    await expect(slow).rejects.toThrow(/no reply to 'readq 0x2000' within 200 ms/);
    await expect(queued).rejects.toThrow(/still queued after 200 ms/);
    const next = qt.readw(0x4000n);
    await tick();
    expect(received).toEqual(["readq 0x2000"]); // the abandoned one still owns the wire
    peer.write("OK 0x1111111111111111\n"); // late reply to readq: dropped
    await tick();
    expect(received).toEqual(["readq 0x2000", "readw 0x4000"]);
    peer.write("OK 0x2222\n");
    expect(await next).toBe(0x2222);
  });

  it("rejects FAIL and ERR replies with the line", async () => {
    const f = qt.command("bogus");
    await tick();
    peer.write("FAIL Unknown command 'bogus'\n");
    await expect(f).rejects.toThrow(/'bogus' failed: FAIL Unknown command/);
    const e = qt.write(0n, Buffer.from([1, 2, 3]));
    await tick();
    peer.write("ERR invalid argument size\n");
    await expect(e).rejects.toThrow(/ERR invalid argument size/);
  });

  it("rejects everything once the peer closes", async () => {
    const p = qt.readl(0n);
    await tick();
    peer.end();
    await expect(p).rejects.toThrow(/connection closed/);
    await expect(qt.readl(0n)).rejects.toThrow(/connection closed/);
  });
});
