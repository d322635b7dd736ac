/**
 * Faults on demand against QEMU's migrating client (the fixed build): each
 * migration case runs `serve --fault SPEC` on the source or the
 * destination, migrates edu with QMP `migrate` (`return-path` on), and
 * asserts what QEMU did about it, as measured: how the migration ended and
 * with which error, whether the source VM and its device run again with
 * their state, whether QEMU sent DEVICE_RESET, how the destination ended,
 * whether a QEMU died. Two more cases run one QEMU: a refused DMA_MAP while
 * it starts, and a lost MSI. docs/qemu-client-conformance.md has the table
 * these runs print.
 *
 * Every wait is bounded: a migration that does not end by its deadline is
 * recorded as such and cancelled; a QEMU that aborts is recorded, not
 * awaited.
 */
import { afterEach, expect, it } from "vitest";
import { EduDevice, eduFactorial } from "../../devices/edu/edu.ts";
import { describeQemuMig } from "./harness/describe-qemu.ts";
import { EduGuest, REG, bringUp, msiCapability, pattern, pollUntil, programMsi, setMsiEnabled } from "./harness/edu-guest.ts";
import { runState, settledRunState, startMigration, type MigrateInfo } from "./harness/migrate.ts";
import { MIG_SLOT, MigrationPair, commandCounts, logged, states } from "./harness/mig-pair.ts";
import * as pci from "./harness/pci.ts";
import { startQemu, type QemuInstance } from "./harness/qemu.ts";
import { received, spawnCliServer, startServer, type CliServer, type ServerHandle } from "./harness/server.ts";
import { makeSharedDir, type SharedDir } from "./harness/shared-dir.ts";

const BDF = pci.bdf(0, MIG_SLOT, 0);
const LIVENESS = 0x0badf00d;

let pair: MigrationPair | undefined;
let single: { qemu?: QemuInstance; server?: CliServer; inProcess?: ServerHandle; dir: SharedDir } | undefined;
afterEach(async () => {
  await pair?.stop();
  pair = undefined;
  if (single) {
    await single.qemu?.stop();
    await single.server?.stop();
    single.inProcess?.close();
    single.dir.cleanup();
    single = undefined;
  }
});

/** What one faulty migration came to. */
interface Outcome {
  /** The source's end status; "no end within N s" (then cancelled); or "source QEMU died". */
  status: string;
  error: string;
  downtimeMs: number | null;
  /** The destination's MIGRATION statuses. */
  destination: string[];
  /** The source VM's run state afterwards ("gone" when its QEMU died). */
  sourceVm: string;
  /** The source's edu holds its registers and computes (null: not checked, the VM is not running). */
  sourceDeviceIntact: boolean | null;
  /** The destination VM runs with edu's registers as the source left them (null: the destination is not running). */
  destinationDeviceMigrated: boolean | null;
  /** The state sequences each server logged ("FROM->NOW" per request), from migrate on. */
  statesA: string[];
  statesB: string[];
  /** DEVICE_RESETs QEMU sent each server after migrate. */
  resetsA: number;
  resetsB: number;
  /** How each QEMU ended: "running", or its exit. */
  sourceQemu: string;
  destinationQemu: string;
  /** QEMU's own words (vfio and migration lines of its stderr). */
  sourceSays: string[];
  destinationSays: string[];
  /** The fault's warnings in each server's log. */
  fired: number;
}

interface Case {
  source?: string[];
  destination?: string[];
  /** Deadline for the source's end status (ms, default 30 000). */
  deadlineMs?: number;
}

const rows: string[] = [];

function says(q: QemuInstance): string[] {
  return q
    .stderr()
    .split("\n")
    .filter((l) => /^qemu(-system-x86_64)?: /.test(l) && !/Could not enable error recovery|^qemu-system-x86_64: -device/.test(l))
    .map((l) => l.replace(/^qemu(-system-x86_64)?: /, "").replace(/\/tmp\/vfu-fault-[^/]+\//g, ""));
}

async function ended(q: QemuInstance, withinMs: number): Promise<string> {
  const e = await Promise.race([q.exited, new Promise<null>((r) => setTimeout(() => r(null), withinMs))]);
  if (e === null) return "running";
  return e.signal ? `died (${e.signal})` : `exited ${e.code}`;
}

async function faultyMigration(name: string, c: Case): Promise<Outcome> {
  const faultArgs = (specs: string[] | undefined) => (specs ?? []).flatMap((s) => ["--fault", s]);
  const p = (pair = new MigrationPair(`vfu-fault-${name}-`, { serverArgs: faultArgs(c.source), destinationServerArgs: faultArgs(c.destination) }));
  try {
    await p.startSource();
    const bar0 = await bringUp(p.src.qtest, BDF, new pci.BarAllocator());
    const e = new EduGuest(p.src.qtest, BDF, bar0);
    await e.write(REG.LIVENESS, LIVENESS);
    expect(await e.factorial(8)).toBe(eduFactorial(8));
    await p.startDestination();
    const markA = p.srvA.log.length;
    const markB = p.srvB.log.length;
    const m = await startMigration(p.src, p.dst, p.dir, { capabilities: { "return-path": true } });
    const deadline = c.deadlineMs ?? 30_000;
    const died = p.src.exited.then(() => "died" as const);
    // waitSource rejects at once when the source's QMP closes (QEMU dying): that is "died", once it has exited
    const end = await Promise.race([m.waitSource(undefined, deadline).catch(async () => (p.src.qmp.closed ? await died : ("deadline" as const))), died]);
    let status: string;
    let info: MigrateInfo = { status: "?" };
    if (end === "died") {
      status = "source QEMU died";
    } else if (end === "deadline") {
      info = await p.src.qmp.execute<MigrateInfo>("query-migrate");
      status = `no end within ${deadline / 1000} s (${info.status}; cancelled)`;
      await p.src.qmp.execute("migrate_cancel");
      await m.waitSource(["cancelled", "failed", "completed"], 30_000);
    } else {
      status = end;
      info = await p.src.qmp.execute<MigrateInfo>("query-migrate");
    }
    const destinationCompleted = m.destinationStatuses().includes("completed");
    // a destination that failed exits; give it (and a dying source) time to do so
    const destinationQemu = await ended(p.dst, destinationCompleted ? 0 : 15_000);
    const sourceQemu = await ended(p.src, end === "died" ? 15_000 : 0);
    const sourceVm = sourceQemu === "running" ? await settledRunState(p.src) : "gone";
    let intact: boolean | null = null;
    if (sourceVm === "running") {
      intact = (await e.read(REG.LIVENESS)) === (~LIVENESS >>> 0) && (await e.read(REG.FACTORIAL)) === eduFactorial(8) && (await e.factorial(5)) === eduFactorial(5);
    }
    let migrated: boolean | null = null;
    if (destinationQemu === "running" && destinationCompleted && (await settledRunState(p.dst)) === "running") {
      const d = new EduGuest(p.dst.qtest, BDF, bar0);
      migrated = (await d.read(REG.LIVENESS)) === (~LIVENESS >>> 0) && (await d.read(REG.FACTORIAL)) === eduFactorial(8);
    }
    const o: Outcome = {
      status,
      error: info["error-desc"] ?? "",
      downtimeMs: info.downtime ?? null,
      destination: m.destinationStatuses(),
      sourceVm,
      sourceDeviceIntact: intact,
      destinationDeviceMigrated: migrated,
      statesA: states(p.srvA, markA),
      statesB: states(p.srvB, markB),
      resetsA: commandCounts(p.srvA, markA).DEVICE_RESET ?? 0,
      resetsB: commandCounts(p.srvB, markB).DEVICE_RESET ?? 0,
      sourceQemu,
      destinationQemu,
      sourceSays: says(p.src),
      destinationSays: says(p.dst),
      fired: logged(p.srvA, /^fault injected/, markA).length + logged(p.srvB, /^fault injected/, markB).length,
    };
    const where = c.source ? `source \`${c.source.join(" ")}\`` : `destination \`${(c.destination ?? []).join(" ")}\``;
    const vm = `${o.sourceVm}${o.sourceDeviceIntact === null ? "" : o.sourceDeviceIntact ? ", device state kept" : ", device reset (state lost)"}`;
    const dst = `${o.destination.join(" → ") || "-"}; ${o.destinationQemu}${o.destinationDeviceMigrated === null ? "" : o.destinationDeviceMigrated ? ", edu migrated" : ", edu NOT migrated"}`;
    rows.push(`| ${where} | ${o.status}${o.error ? `: ${o.error.replace(/\/tmp\/vfu-fault-[^/]+\//g, "")}` : ""} | ${vm} | ${o.resetsA}/${o.resetsB} | A: ${o.statesA.join(", ") || "-"}; B: ${o.statesB.join(", ") || "-"} | ${dst} | ${[...o.sourceSays.map((s) => `src: ${s}`), ...o.destinationSays.map((s) => `dst: ${s}`)].slice(0, 4).join("; ") || "-"} |`);
    console.log(`[qemu-mig fault] ${name}: ${JSON.stringify(o, null, 1)}`);
    expect(o.fired, "the fault fired").toBeGreaterThanOrEqual(1);
    return o;
  } catch (err) {
    if (err instanceof Error) err.message += `\n${p.context()}`;
    throw err;
  }
}

describeQemuMig("faults on demand: what QEMU's migrating client does", () => {
  it("source arc=RUNNING>PRE_COPY,errno=EIO: QEMU puts the device back to RUNNING and migrates without pre-copy (all device data at stop-copy)", async () => {
    const o = await faultyMigration("setup", { source: ["arc=RUNNING>PRE_COPY,errno=EIO"] });
    expect(o.status).toBe("completed");
    expect(o.statesA[0]).toBe("RUNNING->RUNNING");
    expect(o.statesA.some((s) => s.includes("PRE_COPY"))).toBe(false);
    expect(o.statesA.slice(-2)).toEqual(["STOP->STOP_COPY", "STOP_COPY->STOP"]);
    expect(o.destinationDeviceMigrated).toBe(true);
    expect(o.resetsA).toBe(0);
  }, 120_000);

  it("source arc=PRE_COPY>STOP_COPY,errno=EIO (the device stays in PRE_COPY): QEMU takes ERROR as the recover state and resets the device; the VM runs on with the device at power-on", async () => {
    const o = await faultyMigration("switch", { source: ["arc=PRE_COPY>STOP_COPY,errno=EIO"] });
    expect(o.status).toBe("failed");
    expect(o.error).toMatch(/Failed setting device state to STOP_COPY\. Recover state is ERROR\. Resetting device/);
    expect(o.statesA).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->PRE_COPY"]);
    expect(o.resetsA).toBe(1);
    expect(o.sourceVm).toBe("running");
    expect(o.sourceDeviceIntact).toBe(false);
    expect(o.destinationQemu).not.toBe("running");
  }, 120_000);

  it("source arc=PRE_COPY>STOP_COPY,error (the device enters ERROR): the same: DEVICE_RESET, VM runs on, device at power-on", async () => {
    const o = await faultyMigration("switch-error", { source: ["arc=PRE_COPY>STOP_COPY,error"] });
    expect(o.status).toBe("failed");
    expect(o.error).toMatch(/Recover state is ERROR\. Resetting device/);
    expect(o.statesA).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->ERROR"]);
    expect(o.resetsA).toBe(1);
    expect(o.sourceDeviceIntact).toBe(false);
  }, 120_000);

  it("source arc=STOP_COPY>STOP,errno=EIO (after the whole stream was read): the migration completes anyway; QEMU resets the source device", async () => {
    const o = await faultyMigration("stop", { source: ["arc=STOP_COPY>STOP,errno=EIO"] });
    expect(o.status).toBe("completed");
    expect(o.statesA).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->STOP_COPY", "STOP_COPY->STOP_COPY"]);
    expect(o.resetsA).toBe(1);
    expect(o.destinationDeviceMigrated).toBe(true);
  }, 120_000);

  it("source arc=PRE_COPY>STOP_COPY,delay=3000 (under QEMU's 5 s reply timeout): completes; the downtime holds the delay", async () => {
    const o = await faultyMigration("delay", { source: ["arc=PRE_COPY>STOP_COPY,delay=3000"] });
    expect(o.status).toBe("completed");
    expect(o.downtimeMs).toBeGreaterThanOrEqual(3000);
    expect(o.destinationDeviceMigrated).toBe(true);
  }, 120_000);

  it("source arc=PRE_COPY>STOP_COPY,delay=8000 (over QEMU's 5 s reply timeout): QEMU gives up on the reply, misreads the late one, its DEVICE_RESET times out, and the source QEMU aborts ('hardware error')", async () => {
    const o = await faultyMigration("delay-long", { source: ["arc=PRE_COPY>STOP_COPY,delay=8000"] });
    expect(o.status).toBe("source QEMU died");
    expect(o.sourceQemu).toBe("died (SIGABRT)");
    expect(o.sourceSays).toContain("vfio_user_device_io_device_feature: timed out waiting for reply: Connection timed out");
    expect(o.sourceSays.some((s) => /^hardware error: .*Failed resetting device/.test(s.replace(/^qemu: /, "")))).toBe(true);
  }, 120_000);

  it("source cmd=MIG_DATA_READ,in=STOP_COPY,short=64: QEMU reads on until an empty reply; completes, edu migrated", async () => {
    const o = await faultyMigration("short", { source: ["cmd=MIG_DATA_READ,in=STOP_COPY,short=64"] });
    expect(o.status).toBe("completed");
    expect(o.destinationDeviceMigrated).toBe(true);
  }, 120_000);

  it("source cmd=MIG_DATA_READ,in=STOP_COPY,corrupt=100: the destination server refuses the stream; with return-path the source resumes, device state kept", async () => {
    const o = await faultyMigration("corrupt", { source: ["cmd=MIG_DATA_READ,in=STOP_COPY,corrupt=100"] });
    expect(o.status).toBe("failed");
    expect(o.statesA).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->STOP_COPY", "STOP_COPY->RUNNING"]);
    expect(o.sourceVm).toBe("running");
    expect(o.sourceDeviceIntact).toBe(true);
    expect(o.resetsA).toBe(0);
    expect(o.destinationQemu).not.toBe("running");
  }, 120_000);

  it("source feature=MIG_DATA_SIZE,size=1T,times=all: QEMU never switches over (pre-copy goes on); cancelled, the source runs on intact", async () => {
    const o = await faultyMigration("size", { source: ["feature=MIG_DATA_SIZE,size=1T,times=all"], deadlineMs: 20_000 });
    expect(o.status).toMatch(/^no end within 20 s \(active; cancelled\)$/);
    expect(o.statesA).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->RUNNING"]);
    expect(o.sourceDeviceIntact).toBe(true);
  }, 120_000);

  it("source cmd=MIG_GET_PRECOPY_INFO,initial=1G,times=all: no effect without switchover-ack; completes", async () => {
    const o = await faultyMigration("precopy", { source: ["cmd=MIG_GET_PRECOPY_INFO,initial=1G,times=all"] });
    expect(o.status).toBe("completed");
    expect(o.destinationDeviceMigrated).toBe(true);
  }, 120_000);

  it("source feature=DMA_LOGGING_START,errno=EIO: the migration fails at setup; no state change, the VM runs on intact", async () => {
    const o = await faultyMigration("logstart", { source: ["feature=DMA_LOGGING_START,errno=EIO"] });
    expect(o.status).toBe("failed");
    expect(o.error).toMatch(/Could not start dirty page tracking .*Failed to start DMA logging: Input\/output error/);
    expect(o.statesA).toEqual([]);
    expect(o.sourceDeviceIntact).toBe(true);
  }, 120_000);

  it("source feature=DMA_LOGGING_REPORT,errno=EIO: the first report (at setup) fails the migration; the VM runs on intact", async () => {
    const o = await faultyMigration("logreport", { source: ["feature=DMA_LOGGING_REPORT,errno=EIO"] });
    expect(o.status).toBe("failed");
    expect(o.error).toMatch(/ram_save_setup failed: Input\/output error/);
    expect(o.statesA).toEqual([]);
    expect(o.sourceDeviceIntact).toBe(true);
  }, 120_000);

  it("source state=STOP_COPY,drop (the server goes away mid-migration): QEMU's next request times out, its DEVICE_RESET too, and the source QEMU aborts", async () => {
    const o = await faultyMigration("drop", { source: ["state=STOP_COPY,drop"] });
    expect(o.status).toBe("source QEMU died");
    expect(o.sourceQemu).toBe("died (SIGABRT)");
    expect(o.sourceSays).toContain("failed to read header: EOF");
  }, 120_000);

  it("destination arc=STOP>RESUMING,errno=EIO: the source resumes, device state kept; the destination QEMU aborts on an assertion in its error path", async () => {
    const o = await faultyMigration("d-resume", { destination: ["arc=STOP>RESUMING,errno=EIO"] });
    expect(o.status).toBe("failed");
    expect(o.statesB).toEqual(["RUNNING->STOP", "STOP->RUNNING"]);
    expect(o.sourceDeviceIntact).toBe(true);
    expect(o.destinationQemu).toBe("died (SIGABRT)");
    expect(o.destinationSays.some((l) => /error_setv: Assertion `\*errp == NULL' failed/.test(l))).toBe(true);
  }, 120_000);

  it("destination cmd=MIG_DATA_WRITE,errno=EIO: the destination's load fails; the source resumes, device state kept", async () => {
    const o = await faultyMigration("d-write", { destination: ["cmd=MIG_DATA_WRITE,errno=EIO"] });
    expect(o.status).toBe("failed");
    expect(o.sourceDeviceIntact).toBe(true);
    expect(o.destinationQemu).not.toBe("running");
  }, 120_000);

  it("destination arc=RESUMING>STOP,error (the loaded stream fails at the end): QEMU calls the migration completed, resets the destination device and runs the VM with it at power-on", async () => {
    const o = await faultyMigration("d-load", { destination: ["arc=RESUMING>STOP,error"] });
    expect(o.status).toBe("completed");
    expect(o.statesB).toEqual(["RUNNING->RESUMING", "RESUMING->ERROR"]);
    expect(o.resetsB).toBe(1);
    expect(o.destinationQemu).toBe("running");
    expect(o.destinationDeviceMigrated).toBe(false);
    expect(o.sourceVm).toBe("postmigrate");
  }, 120_000);

  it("destination state=RESUMING,drop: the source resumes, device state kept; the destination QEMU times out, its DEVICE_RESET too, and it aborts", async () => {
    const o = await faultyMigration("d-drop", { destination: ["state=RESUMING,drop"] });
    expect(o.status).toBe("failed");
    expect(o.sourceDeviceIntact).toBe(true);
    expect(o.destinationQemu).toBe("died (SIGABRT)");
    expect(o.destinationSays).toContain("failed to read header: EOF");
  }, 120_000);

  it("cmd=DMA_MAP,times=all,errno=ENOSPC while QEMU starts (every map refused): QEMU says nothing and runs; the device's DMA into guest RAM fails", async () => {
    const dir = makeSharedDir("vfu-fault-map-", "mig");
    const srv = startServer({ dir, device: new EduDevice(), name: "s.sock", faults: ["cmd=DMA_MAP,times=all,errno=ENOSPC"] });
    single = { dir, inProcess: srv };
    const q = (single.qemu = await startQemu({ dir, qemu: "mig", vfioUserSocket: srv.socketPath, deviceProps: { id: "vfu0", addr: `${MIG_SLOT}.0` } }));
    const maps = received(srv.log.records(), "DMA_MAP").length;
    const mapped = srv.server.endpoint.dmaTable.regions().map((r) => `0x${r.iova.toString(16)}+0x${r.size.toString(16)}`);
    const bar0 = await bringUp(q.qtest, BDF, new pci.BarAllocator());
    const e = new EduGuest(q.qtest, BDF, bar0);
    const RAM = 0x0100_0000n;
    await q.qtest.write(RAM, pattern(64, 0x31));
    const mark = srv.log.length;
    await e.dma(RAM, 0x40000n, 64, 0x0);
    const dmaFailed = logged({ log: srv.log }, /^edu: DMA failed$/, mark).map((r) => String(r.err));
    const state = await runState(q);
    console.log(`[qemu-mig fault] DMA_MAP: ${maps} DMA_MAPs, mapped: ${mapped.join(", ")}; QEMU ${state}, says: ${says(q).join("; ") || "nothing"}; edu DMA from 16 MiB: ${dmaFailed.join("; ")}`);
    rows.push(`| \`cmd=DMA_MAP,times=all,errno=ENOSPC\` (QEMU starting) | QEMU starts and runs (${maps} DMA_MAPs, all refused) | ${state} | - | - | - | ${says(q).join("; ") || "nothing"}; the device's DMA into guest RAM fails: ${dmaFailed[0] ?? "-"} |`);
    expect(logged({ log: srv.log }, /^fault injected/).length).toBe(maps);
    expect(maps).toBeGreaterThanOrEqual(1);
    expect(mapped).toEqual([]);
    expect(state).toBe("running");
    expect(dmaFailed).toHaveLength(1);
  }, 120_000);

  it("irq=MSI:0,stall=forever: the first MSI of edu's factorial never arrives; the second does", async () => {
    const dir = makeSharedDir("vfu-fault-msi-", "mig");
    single = { dir };
    single.server = await spawnCliServer({ dir, name: "s.sock", args: ["--fault", "irq=MSI:0,stall=forever"] });
    const q = (single.qemu = await startQemu({ dir, qemu: "mig", vfioUserSocket: single.server.socketPath, deviceProps: { id: "vfu0", addr: `${MIG_SLOT}.0` } }));
    const bar0 = await bringUp(q.qtest, BDF, new pci.BarAllocator());
    const e = new EduGuest(q.qtest, BDF, bar0);
    const msi = await msiCapability(q.qtest, BDF);
    const MSI_ADDR = 0x0070_0000n;
    await programMsi(q.qtest, BDF, msi, MSI_ADDR, 0x4d53);
    await setMsiEnabled(q.qtest, BDF, msi, true);
    const factorialIrq = async () => {
      await q.qtest.writel(MSI_ADDR, 0);
      await e.write(REG.STATUS, 0x80);
      await e.write(REG.FACTORIAL, 5);
      await pollUntil("factorial done", () => e.read(REG.STATUS), (s) => (s & 1) === 0, 30_000);
      await e.write(REG.IRQ_ACK, await e.read(REG.IRQ_STATUS));
    };
    await factorialIrq();
    // the first: computed, raised by the device, lost; a bounded wait shows nothing lands
    const first = await pollUntil("an MSI that must not come", () => q.qtest.readl(MSI_ADDR), (v) => v !== 0, 2000).then(() => "arrived", () => "lost");
    await factorialIrq();
    const { value } = await pollUntil("the second MSI", () => q.qtest.readl(MSI_ADDR), (v) => v !== 0, 30_000);
    console.log(`[qemu-mig fault] MSI stall: first ${first}, second 0x${value.toString(16)}`);
    rows.push(`| \`irq=MSI:0,stall=forever\` | - | running | - | - | - | the first factorial's MSI never lands in guest RAM; the second does (0x${value.toString(16)}); QEMU does not notice |`);
    expect(first).toBe("lost");
    expect(value).toBe(0x4d53);
  }, 120_000);

  it("prints the table", () => {
    console.log(["| fault | migration | source VM | DEVICE_RESET A/B | device states (A source, B destination) | destination | QEMU says |", "|---|---|---|---|---|---|---|", ...rows].join("\n"));
  });
});
