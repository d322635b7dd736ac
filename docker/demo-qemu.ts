/**
 * The demo's scripted guest: QEMU (q35, accel=qtest) attached to a running
 * `vfio-user-ts serve --device edu`, driven over qtest the way a guest
 * driver would drive the edu device, one printed step at a time. Reuses the
 * end-to-end harness (test/e2e/harness), so QEMU runs the same way as in the
 * tests: inside the debootstrap root (docker/qemu-root.sh) or natively (the
 * Docker image; VFIO_USER_QEMU=native).
 *
 *   node --import tsx docker/demo-qemu.ts check        is QEMU usable? exit 0 yes,
 *                                                      3 the root is not set up, 1 other
 *   node --import tsx docker/demo-qemu.ts shared-dir   make a directory QEMU can reach, print it
 *   node --import tsx docker/demo-qemu.ts run --socket PATH
 *                                                      the scripted guest; exit 1 on the first failed step
 *
 * docker/demo.sh strings these together; compose.yaml runs `run` against a
 * server in another container.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { parseArgs } from "node:util";
import { startQemu, type QemuInstance } from "../test/e2e/harness/qemu.ts";
import { makeSharedDir, qemuAvailable, qemuMode, qemuRootPath, qemuRootReady, sharedDirAt } from "../test/e2e/harness/shared-dir.ts";
import * as pci from "../test/e2e/harness/pci.ts";
import {
  EDU_DEVICE,
  EDU_VENDOR,
  EduGuest,
  REG,
  bringUp,
  hex,
  msiCapability,
  pattern,
  pollUntil,
  programMsi,
  setMsiEnabled,
} from "../test/e2e/harness/edu-guest.ts";
import { EDU_DMA_BUFFER, EDU_DMA_SIZE, EDU_ID } from "../devices/edu/edu.ts";

/** Guest RAM the demo uses (below 256 MiB: the edu DMA engine masks addresses to 28 bits). */
const RAM_SRC = 0x0010_0000n;
const RAM_DST = 0x0020_0000n;
const MSI_ADDR = 0x0070_0000n;
const MSI_DATA = 0x4d53;
const LIVENESS_IN = 0x12345678;

const color = process.stdout.isTTY && process.env.NO_COLOR === undefined;
const paint = (code: string, s: string) => (color ? `\x1b[${code}m${s}\x1b[0m` : s);
const OK = paint("32", "ok");
const FAIL = paint("31;1", "FAIL");

function where(): string {
  return qemuMode() === "native" ? "native, from PATH" : `in the debootstrap root ${qemuRootPath()}`;
}

function check(): number {
  const a = qemuAvailable();
  if (a.ok) {
    console.log(`${a.version} (${where()})`);
    return 0;
  }
  console.log(a.why);
  let rootMissing = false;
  try {
    rootMissing = qemuMode() === "chroot" && !qemuRootReady();
  } catch {
    // a bad VFIO_USER_QEMU: `why` said so
  }
  return rootMissing ? 3 : 1;
}

class StepFailed extends Error {}

async function run(socket: string): Promise<number> {
  const avail = qemuAvailable();
  if (!avail.ok) {
    console.error(`QEMU is not usable: ${avail.why}`);
    return 1;
  }
  // QEMU's qtest and QMP sockets go in a directory of their own next to the
  // server's socket: reachable by QEMU, and never shared with another run
  // (in compose, every container's node is pid 1, so the names would collide)
  const own = mkdtempSync(join(dirname(socket), "qemu-"));
  const dir = sharedDirAt(own);
  let q: QemuInstance | undefined;
  let n = 0;
  const step = async (title: string, fn: () => Promise<string>): Promise<void> => {
    n++;
    const t0 = performance.now();
    console.log(`\n  ${paint("1", String(n).padStart(2))}  ${title}`);
    try {
      const result = await fn();
      const ms = performance.now() - t0;
      for (const [i, line] of result.split("\n").entries()) console.log(`      ${i === 0 ? OK : "  "}  ${line}${i === 0 ? paint("2", `  (${ms.toFixed(0)} ms)`) : ""}`);
    } catch (e) {
      console.log(`      ${FAIL}  ${(e as Error).message.split("\n")[0]}`);
      const rest = (e as Error).message.split("\n").slice(1).join("\n");
      if (rest) console.log(rest.replace(/^/gm, "            "));
      if (q) {
        const own = q
          .stderr()
          .split("\n")
          .filter((l) => l.trim() !== "" && !/^\[[RS] \+/.test(l))
          .slice(-15);
        if (own.length) console.log(`      QEMU said:\n${own.map((l) => `            ${l}`).join("\n")}`);
      }
      throw new StepFailed(title);
    }
  };

  console.log(`Scripted guest: ${avail.version} (${where()}), q35 with accel=qtest, so this script plays the guest CPU`);
  console.log(`Server socket: ${socket}`);
  try {
    let edu: EduGuest | undefined;
    const need = () => {
      if (!edu) throw new Error("no device");
      return edu;
    };

    await step("Start QEMU with a vfio-user-pci device on the server's socket", async () => {
      q = await startQemu({ dir, memMiB: 256, memfd: true, vfioUserSocket: socket, deviceProps: { id: "edu0" } });
      return `machine built and vfio-user-pci realized against the server ${q.realizeMs.toFixed(0)} ms after spawn\n256 MiB guest RAM in a shared memfd, so the server maps it for DMA`;
    });

    await step("Find the device on PCI bus 0 (config mechanism #1, ports 0xcf8/0xcfc)", async () => {
      const found = await pci.listDevices(q!.qtest);
      const f = found.find((d) => d.vendor === EDU_VENDOR && d.device === EDU_DEVICE);
      if (!f) throw new Error(`no 1234:11e8 on bus 0; found ${found.map((d) => `${pci.formatBdf(d.bdf)} ${d.vendor.toString(16)}:${d.device.toString(16)}`).join(", ")}`);
      edu = new EduGuest(q!.qtest, f.bdf, 0n);
      return `${pci.formatBdf(f.bdf)}  vendor 0x1234 device 0x11e8 (QEMU's edu), class ${f.classCode.toString(16).padStart(6, "0")}, revision 0x${f.revision.toString(16)}`;
    });

    await step("Size BAR0, assign it an address, enable memory decoding and bus mastering", async () => {
      const qt = q!.qtest;
      const b = need().bdf;
      const size = await pci.barSize(qt, b, 0);
      const bar0 = await bringUp(qt, b, new pci.BarAllocator());
      edu = new EduGuest(qt, b, bar0);
      const cmd = await pci.cfgRead16(qt, b, pci.PCI_COMMAND);
      return `BAR0: ${Number(size) >> 20} MiB of MMIO at ${hex(bar0)}; command register ${hex(cmd)}`;
    });

    await step("Read the identification register (BAR0 + 0x00)", async () => {
      const id = await need().read(REG.ID);
      if (id !== EDU_ID) throw new Error(`read ${hex(id)}, expected ${hex(EDU_ID)}`);
      return `0x${id.toString(16).padStart(8, "0")}: edu version ${id >>> 24}.${(id >>> 16) & 0xff}, magic 0x${(id & 0xff).toString(16)}`;
    });

    await step("Liveness check: write a value to BAR0 + 0x04, read back its bitwise inverse", async () => {
      const e = need();
      await e.write(REG.LIVENESS, LIVENESS_IN);
      const got = await e.read(REG.LIVENESS);
      const want = ~LIVENESS_IN >>> 0;
      if (got !== want) throw new Error(`wrote ${hex(LIVENESS_IN)}, read ${hex(got)}, expected ${hex(want)}`);
      return `wrote ${hex(LIVENESS_IN)}, read ${hex(got)}`;
    });

    await step("Factorial: write 10 to BAR0 + 0x08, wait for status bit 0 to clear, read the result", async () => {
      const got = await need().factorial(10);
      if (got !== 3628800) throw new Error(`10! read as ${got}, expected 3628800`);
      return `10! = ${got}`;
    });

    await step("DMA round trip: guest RAM -> device buffer -> other guest RAM, 4 KiB", async () => {
      const e = need();
      const qt = q!.qtest;
      const data = pattern(EDU_DMA_SIZE, 0xd3a0);
      await qt.write(RAM_SRC, data);
      await qt.memset(RAM_DST, EDU_DMA_SIZE, 0);
      await e.dma(RAM_SRC, EDU_DMA_BUFFER, EDU_DMA_SIZE, 0x1);
      await e.dma(EDU_DMA_BUFFER, RAM_DST, EDU_DMA_SIZE, 0x3);
      const back = await qt.read(RAM_DST, EDU_DMA_SIZE);
      if (!back.equals(data)) {
        const at = back.findIndex((b, i) => b !== data[i]);
        throw new Error(`the copy differs from byte ${at} on (${back.subarray(at, at + 8).toString("hex")} vs ${data.subarray(at, at + 8).toString("hex")})`);
      }
      return `${EDU_DMA_SIZE} bytes ${hex(RAM_SRC)} -> device ${hex(EDU_DMA_BUFFER)} -> ${hex(RAM_DST)}: identical (first bytes ${data.subarray(0, 8).toString("hex")})`;
    });

    await step("MSI: point the MSI capability at guest RAM, raise an interrupt (BAR0 + 0x60), watch the write land", async () => {
      const e = need();
      const qt = q!.qtest;
      const cap = await msiCapability(qt, e.bdf);
      await programMsi(qt, e.bdf, cap, MSI_ADDR, MSI_DATA);
      await qt.writel(MSI_ADDR, 0);
      await setMsiEnabled(qt, e.bdf, cap, true);
      const t0 = performance.now();
      await e.write(REG.IRQ_RAISE, 0x1);
      const { value } = await pollUntil(`the MSI write at ${hex(MSI_ADDR)}`, () => qt.readl(MSI_ADDR), (v) => v !== 0);
      const ms = performance.now() - t0;
      if (value !== MSI_DATA) throw new Error(`guest RAM at ${hex(MSI_ADDR)} holds ${hex(value)}, expected the MSI data ${hex(MSI_DATA)}`);
      const status = await e.read(REG.IRQ_STATUS);
      await e.write(REG.IRQ_ACK, status);
      return `MSI data ${hex(value)} landed at guest RAM ${hex(MSI_ADDR)} ${ms.toFixed(1)} ms after the raise\ninterrupt status was ${hex(status)}, acknowledged`;
    });

    await step("Shut QEMU down (SIGTERM)", async () => {
      const exit = await q!.stop();
      if (exit.code !== 0) throw new Error(`QEMU exited with ${exit.code ?? exit.signal}`);
      return "QEMU exited with status 0; the server keeps running for the next client";
    });
    console.log(`\nAll ${n} steps passed.`);
    return 0;
  } catch (e) {
    if (!(e instanceof StepFailed)) console.log(`\n${FAIL}: ${(e as Error).stack ?? String(e)}`);
    else console.log(`\nStep ${n} failed: ${e.message}`);
    return 1;
  } finally {
    await q?.stop();
    rmSync(own, { recursive: true, force: true });
  }
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case "check":
      return check();
    case "shared-dir": {
      const a = qemuAvailable();
      if (!a.ok) {
        console.error(a.why);
        return 1;
      }
      console.log(makeSharedDir("vfu-demo-").host);
      return 0;
    }
    case "run": {
      const { values } = parseArgs({ args: rest, options: { socket: { type: "string" } }, strict: true });
      if (!values.socket) {
        console.error("demo-qemu: run needs --socket PATH");
        return 2;
      }
      return run(values.socket);
    }
    default:
      console.error("usage: demo-qemu.ts check | shared-dir | run --socket PATH");
      return 2;
  }
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (e) {
  // configuration errors (e.g. a bad VFIO_USER_QEMU) read better without a stack
  console.log((e as Error).message);
  process.exitCode = 1;
}
