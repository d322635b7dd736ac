/**
 * `vfio-user-ts serve --client-report FILE --fault SPEC` as a process: a
 * fault spec that does not parse is a usage error with its column (exit
 * 2); a client's mistakes end up in the JSON file and in a table on stderr
 * when it leaves and when the server stops; a fault fires and is logged.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { Command, Errno, Feature, FeatureFlags } from "../../protocol/index.ts";
import type { ConformanceReport } from "../../src/conformance/index.ts";
import { CLI, ROOT, RawClient, eventually, le, tmpDir } from "./raw-client.ts";

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function serve(args: string[]) {
  const proc = spawn(process.execPath, [CLI, "serve", "--log-format", "json", ...args], { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  proc.stdout!.on("data", (s: Buffer) => (out += s.toString()));
  proc.stderr!.on("data", (s: Buffer) => (err += s.toString()));
  const exited = new Promise<number | null>((resolve) => proc.on("close", (code) => resolve(code)));
  return { proc, exited, out: () => out, err: () => err };
}

describe("serve --fault / --client-report", () => {
  it("a fault spec that does not parse: usage error naming the spec and the column, exit 2", async () => {
    const s = serve(["--socket", "/tmp/vfu-never.sock", "--fault", "cmd=DMA_MAP,errno=EIO", "--fault", "arc=RUNNING>HALT,errno=EIO"]);
    expect(await s.exited).toBe(2);
    expect(s.err().split("\n")[0]).toBe("vfio-user-ts: --fault 'arc=RUNNING>HALT,errno=EIO': column 13: unknown migration state 'HALT' (states: ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P)");
    expect(s.out()).toBe("");
  }, 30_000);

  it("a client's mistakes: the report file after it leaves and after the server stops, tables on stderr; the fault fired and logged", async () => {
    const dir = tmpDir("vfu-bench-cli-");
    dirs.push(dir);
    const socket = path.join(dir, "s.sock");
    const file = path.join(dir, "report.json");
    const s = serve(["--socket", socket, "--client-report", file, "--fault", "cmd=DMA_MAP,nth=2,errno=ENOSPC"]);
    expect(await eventually(() => /serving/.test(s.out()), 20_000)).toBe(true);
    const c = await RawClient.ready(socket);
    const map = (a: bigint) => le().u32(32).u32(3).u64(0).u64(a).u64(0x1000).buf;
    expect((await c.request(Command.DMA_MAP, map(0x10000n))).header.error).toBe(0);
    expect((await c.request(Command.DMA_MAP, map(0x20000n))).header.error).toBe(Errno.ENOSPC);
    const kernelStart = le().u32(32).u32(Feature.DMA_LOGGING_START | FeatureFlags.SET).u64(4096).u32(1).u32(0).u64(0x7f00n).buf;
    const startId = c.send(Command.DEVICE_FEATURE, kernelStart);
    expect((await c.reply(startId)).header.error).toBe(Errno.EINVAL);
    c.close();
    expect(await eventually(() => /client conformance, connection 1: 1 error, 0 warnings in 4 messages/.test(s.err()), 10_000)).toBe(true);
    const afterLeave = JSON.parse(fs.readFileSync(file, "utf8")) as ConformanceReport;
    expect(afterLeave.clients).toHaveLength(1);
    expect(afterLeave.clients[0]!.deviations.map((d) => [d.id, d.command, d.first.msgId, d.first.offset])).toEqual([["dma-logging-ranges-not-inline", "DEVICE_FEATURE", startId, 24]]);
    expect(afterLeave.clients[0]!.disconnectedAt).not.toBeNull();
    expect(s.err()).toMatch(/error\s+dma-logging-ranges-not-inline\s+DEVICE_FEATURE\s+1\s+0x[0-9a-f]{4}\s+24\s+vfio-user: VFIO_DEVICE_FEATURE_DMA_LOGGING_START/);
    // the fault's warning is in the JSON log
    const warns = s.err().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as { msg: string; level: number; fault?: string });
    expect(warns.filter((w) => w.msg.startsWith("fault injected")).map((w) => [w.level, w.fault, w.msg])).toEqual([[40, "cmd=DMA_MAP,nth=2,errno=ENOSPC", "fault injected: refused with ENOSPC"]]);
    s.proc.kill("SIGTERM");
    expect(await s.exited).toBe(0);
    expect(s.err()).toMatch(/client conformance, all 1 connection: 1 error, 0 warnings/);
    expect((JSON.parse(fs.readFileSync(file, "utf8")) as ConformanceReport).errors).toBe(1);
  }, 60_000);
});
