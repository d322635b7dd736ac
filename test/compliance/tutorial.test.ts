/**
 * The tutorial device (devices/tutorial/counter.ts) and its text
 * (devices/tutorial/README.md): the device does what the text says, driven
 * through a real server with the TypeScript client, migrates, and the text
 * stays in sync with the code (every ```ts excerpt appears verbatim in the
 * file it quotes; the CLI output shown is what the CLI prints).
 */
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { COUNTER_ID, IRQ_ALARM, IRQ_REPORT, REG, counterFactory } from "../../devices/tutorial/counter.ts";
import { CHECKS } from "../../src/compliance/checks.ts";
import { formatCheckResult } from "../../src/compliance/runner.ts";
import { qemuCommandLine } from "../../src/cli/main.ts";
import { CHECK_USAGE } from "../../src/cli/check.ts";
import { GuestMemory, IrqIndex, MigState, MigrationDriver, RegionIndex, VfioUserClient, closeFd, createEventfd, waitEventfd } from "../../src/client/index.ts";
import { VfioUserServer, runCompliance, silentLogger } from "../../src/index.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const TUTORIAL = path.join(ROOT, "devices/tutorial/README.md");
const DEVICE_FILE = "devices/tutorial/counter.ts";

let dir: string;
const cleanups: (() => void | Promise<void>)[] = [];

beforeEach(() => {
  dir = mkdtempSync(path.join(tmpdir(), "vfio-user-tutorial-"));
});

afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  rmSync(dir, { recursive: true, force: true });
});

/** A counter served on a socket in `dir`, and a connected client. */
async function serveCounter(name: string, options = {}) {
  const device = counterFactory.create(options);
  const server = new VfioUserServer({ device, log: silentLogger() });
  const socket = path.join(dir, `${name}.sock`);
  server.listen(socket);
  const client = await VfioUserClient.connect(socket);
  await client.negotiate();
  cleanups.push(async () => {
    client.close();
    await client.closedPromise;
    server.close();
  });
  return { device, server, client };
}

describe("the tutorial device", () => {
  it("counts, raises the alarm on INTx, and reports by DMA", async () => {
    const { client } = await serveCounter("counter");
    const ram = GuestMemory.create(1n << 20n); // guest RAM at IOVA 0, shared as a memfd
    cleanups.push(() => ram.close());
    const intx = createEventfd();
    cleanups.push(() => closeFd(intx));

    await ram.mapInto(client);
    await client.writeU32(RegionIndex.CONFIG, 0x04, 0x0006); // command: memory space + bus master
    await client.setIrqEventfds(IrqIndex.INTX, 0, [intx]);
    expect(await client.readU32(0, REG.ID)).toBe(0xc0de0001);

    await client.writeU32(0, REG.ALARM, 10);
    await client.writeU32(0, REG.ADD, 4);
    await client.writeU32(0, REG.ADD, 6); // COUNT reaches 10: the alarm goes off
    await waitEventfd(intx);
    expect(await client.readU32(0, REG.IRQ_STATUS)).toBe(IRQ_ALARM);
    await client.writeU32(0, REG.IRQ_STATUS, IRQ_ALARM); // acknowledge: INTx goes low
    await client.unmaskIrq(IrqIndex.INTX); // VFIO masks INTx after each interrupt

    await client.writeU32(0, REG.REPORT_LO, 0x1000);
    await client.writeU32(0, REG.REPORT, 1);
    await waitEventfd(intx);
    expect(ram.read(0x1000, 8)).toEqual(Buffer.from([10, 0, 0, 0, 10, 0, 0, 0])); // COUNT, ALARM
    expect(await client.readU32(0, REG.IRQ_STATUS)).toBe(IRQ_REPORT);
  });

  it("uses MSI once the guest enables it, and INTx stays low", async () => {
    const { client } = await serveCounter("counter");
    const msi = createEventfd();
    const intx = createEventfd();
    cleanups.push(() => closeFd(msi), () => closeFd(intx));
    await client.setIrqEventfds(IrqIndex.MSI, 0, [msi]);
    await client.setIrqEventfds(IrqIndex.INTX, 0, [intx]);
    const cap = (await client.regionRead(RegionIndex.CONFIG, 0x34, 1))[0]!;
    expect((await client.regionRead(RegionIndex.CONFIG, cap, 1))[0]).toBe(0x05); // the MSI capability
    await client.regionWrite(RegionIndex.CONFIG, cap + 2, Buffer.from([0x01, 0x00])); // MSI enable
    await client.writeU32(0, REG.ALARM, 1);
    await client.writeU32(0, REG.COUNT, 5);
    expect(await waitEventfd(msi)).toBe(1n);
    const status = (await client.regionRead(RegionIndex.CONFIG, 0x06, 2)).readUInt16LE(0);
    expect(status & 0x08).toBe(0); // no INTx asserted
    await expect(waitEventfd(intx, 50)).rejects.toThrow(/not signalled/);
  });

  it("ignores accesses that are not 32-bit and refuses bad options", async () => {
    const { client } = await serveCounter("counter", { start: "41" });
    expect(await client.readU32(0, REG.COUNT)).toBe(41);
    expect((await client.regionRead(0, REG.COUNT, 2)).toString("hex")).toBe("ffff");
    await client.regionWrite(0, REG.COUNT, Buffer.from([1, 2]));
    expect(await client.readU32(0, REG.COUNT)).toBe(41);
    await client.reset();
    expect(await client.readU32(0, REG.COUNT)).toBe(41); // reset goes back to start
    expect(() => counterFactory.create({ stop: "1" })).toThrow("counter: unknown option 'stop' (known: start)");
    expect(() => counterFactory.create({ start: "-1" })).toThrow("counter: start=-1: -1 is out of range (0..4294967295)");
    expect(() => counterFactory.create({ start: "abc" })).toThrow("counter: start=abc: 'abc' is not an integer (decimal, or hex with 0x)");
  });

  it("migrates with the migration driver: registers, a raised interrupt and config space arrive", async () => {
    const a = await serveCounter("source");
    const b = await serveCounter("destination");
    const ramA = GuestMemory.create(1n << 20n);
    const ramB = GuestMemory.create(1n << 20n);
    cleanups.push(() => ramA.close(), () => ramB.close());
    await ramA.mapInto(a.client);
    await ramB.mapInto(b.client);
    await a.client.writeU32(0, REG.COUNT, 1234);
    await a.client.writeU32(0, REG.ALARM, 1000); // 1234 >= 1000: IRQ_ALARM is pending
    await a.client.writeU32(0, REG.REPORT_HI, 0xab);

    const driver = new MigrationDriver({ client: a.client, ram: ramA }, { client: b.client, ram: ramB });
    const result = await driver.run();

    expect(result.rounds.length).toBeGreaterThanOrEqual(1);
    expect(await b.client.getMigState()).toBe(MigState.RUNNING);
    expect(await b.client.readU32(0, REG.COUNT)).toBe(1234);
    expect(await b.client.readU32(0, REG.IRQ_STATUS)).toBe(IRQ_ALARM);
    expect(await b.client.readU32(0, REG.REPORT_HI)).toBe(0xab);
    // INTx was asserted on the source: the status bit came along with config space
    expect((await b.client.regionRead(RegionIndex.CONFIG, 0x06, 2)).readUInt16LE(0) & 0x08).toBe(0x08);
  });

  it("a report the source could not finish is done by the destination", async () => {
    const a = await serveCounter("source");
    const b = await serveCounter("destination");
    const ram = GuestMemory.create(1n << 20n);
    cleanups.push(() => ram.close());
    await ram.mapInto(b.client);
    for (const c of [a.client, b.client]) await c.writeU32(RegionIndex.CONFIG, 0x04, 0x0006);
    await a.client.writeU32(0, REG.COUNT, 77);
    await a.client.writeU32(0, REG.REPORT_LO, 0x2000);
    // the source is stopped (no DMA) when the guest's REPORT write arrives
    await a.client.setMigState(MigState.STOP);
    await a.client.writeU32(0, REG.REPORT, 1);
    expect((a.device.saveState() as { reportPending: boolean }).reportPending).toBe(true);
    await a.client.setMigState(MigState.STOP_COPY);
    const stream: Buffer[] = [];
    for (let chunk = await a.client.migDataRead(); chunk.length > 0; chunk = await a.client.migDataRead()) stream.push(chunk);
    await b.client.setMigState(MigState.RESUMING);
    for (const chunk of stream) await b.client.migDataWrite(chunk);
    await b.client.setMigState(MigState.STOP);
    expect(ram.read(0x2000, 4).readUInt32LE(0)).toBe(0); // nothing before the destination runs
    await b.client.setMigState(MigState.RUNNING);
    for (let i = 0; i < 100 && (await b.client.readU32(0, REG.IRQ_STATUS)) !== IRQ_REPORT; i++) await new Promise((r) => setTimeout(r, 5));
    expect(await b.client.readU32(0, REG.IRQ_STATUS)).toBe(IRQ_REPORT);
    expect(ram.read(0x2000, 4).readUInt32LE(0)).toBe(77);
  });

  it("passes the compliance suite, also with options", async () => {
    const report = await runCompliance(counterFactory, { options: { start: "5" } });
    expect(report.results.filter((r) => !r.passed)).toEqual([]);
  });

  it("loadState refuses a state it cannot load, naming the field", () => {
    const dev = counterFactory.create({});
    const good = dev.saveState() as Record<string, unknown>;
    expect(() => dev.loadState({ ...good, count: -1 })).toThrow('counter: state field "count" is not a u32');
    expect(() => dev.loadState({ ...good, irqStatus: 4 })).toThrow(/"irqStatus" has bits outside 0x3/);
    expect(() => dev.loadState({ ...good, extra: 1 })).toThrow('counter: unknown state field "extra"');
    const { reportPending: _, ...missing } = good;
    expect(() => dev.loadState(missing)).toThrow('counter: state field "reportPending" is missing');
    expect(COUNTER_ID).toBe(0xc0de0001);
  });
});

// ---------------------------------------------------------------------------
// The tutorial text
// ---------------------------------------------------------------------------

interface Block {
  lang: string;
  /** File named by a preceding `<!-- excerpt: PATH -->`, else the device file for ts blocks. */
  source: string | null;
  text: string;
  line: number;
}

function blocks(markdown: string): Block[] {
  const out: Block[] = [];
  const lines = markdown.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\w*)\s*$/.exec(lines[i]!);
    if (!open) continue;
    let prev = i - 1;
    while (prev >= 0 && lines[prev]!.trim() === "") prev--;
    const marker = prev >= 0 ? /^<!-- excerpt: (\S+) -->$/.exec(lines[prev]!.trim()) : null;
    const body: string[] = [];
    let j = i + 1;
    for (; j < lines.length && lines[j] !== "```"; j++) body.push(lines[j]!);
    out.push({ lang: open[1]!, source: marker ? marker[1]! : open[1] === "ts" ? DEVICE_FILE : null, text: body.join("\n"), line: i + 1 });
    i = j;
  }
  return out;
}

describe("devices/tutorial/README.md", () => {
  const text = readFileSync(TUTORIAL, "utf8");
  const all = blocks(text);

  it("has code excerpts from the device file, each verbatim", () => {
    const ts = all.filter((b) => b.lang === "ts");
    expect(ts.filter((b) => b.source === DEVICE_FILE).length).toBeGreaterThanOrEqual(8);
    for (const b of ts) {
      const file = readFileSync(path.join(ROOT, b.source!), "utf8");
      expect(file.includes(b.text), `README line ${b.line}: this excerpt is not in ${b.source} verbatim:\n${b.text}`).toBe(true);
    }
  });

  it("walks through the whole device file", () => {
    // every non-comment line of the class body is shown somewhere (so no step is silently missing)
    const file = readFileSync(path.join(ROOT, DEVICE_FILE), "utf8");
    const shown = all.filter((b) => b.source === DEVICE_FILE).map((b) => b.text).join("\n");
    const missing = file
      .split("\n")
      .filter((l) => l.trim() !== "" && !/^\s*(\/\*\*|\*|\*\/|\/\/)/.test(l))
      .filter((l) => !shown.includes(l));
    expect(missing).toEqual([]);
  });

  it("is under 150 lines of device code", () => {
    const lines = readFileSync(path.join(ROOT, DEVICE_FILE), "utf8").trimEnd().split("\n").length;
    expect(lines).toBeLessThan(150);
    expect(text).toContain(`${lines} lines`);
  });

  // `serve` prints this line with a launcher in front where QEMU runs from the trixie root
  // (see src/cli/qemu.ts); test/e2e/qemu-cli.test.ts runs what `serve` prints
  it("shows the QEMU command line qemuCommandLine() builds for /tmp/counter.sock", () => {
    const sh = all.filter((b) => b.lang === "sh" && b.text.includes("qemu-system-x86_64"));
    expect(sh.length).toBeGreaterThanOrEqual(1);
    expect(sh[0]!.text).toBe(qemuCommandLine("/tmp/counter.sock"));
  });

  it("shows the `check` output the CLI prints, check for check (the bin run as a process)", async () => {
    const out = all.find((b) => b.text.startsWith("vfio-user-ts check: device 'counter'"));
    expect(out, "the check output block").toBeDefined();
    const run = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      execFile(process.execPath, [path.join(ROOT, "src/cli/vfio-user-ts.mjs"), "check", "--device", "counter"], { cwd: ROOT, timeout: 60_000 }, (err, stdout, stderr) =>
        resolve({ code: err === null ? 0 : typeof err.code === "number" ? err.code : null, stdout, stderr }),
      );
    });
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout.trimEnd()).toBe(out!.text.trimEnd());
    const lines = out!.text.split("\n");
    const expected = CHECKS.map((c) => formatCheckResult({ id: c.id, title: c.title, passed: true, problems: [], notes: [], ms: 0 }));
    expect(lines.slice(1, 1 + CHECKS.length)).toEqual(expected);
    expect(lines[1 + CHECKS.length]).toBe(`${CHECKS.length} passed, 0 failed`);
    expect(CHECK_USAGE).toContain("--opt KEY=VALUE");
  });
});
