/**
 * `vfio-user-ts check`: help, the check list, clear usage errors (exit 2),
 * PASS lines and exit 0 for a good device. (A failing device: negative.test.ts.)
 */
import { execFile } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it, vi } from "vitest";
import { DEVICES } from "../../devices/index.ts";
import { CHECK_USAGE, checkCommand } from "../../src/cli/check.ts";
import { main } from "../../src/cli/main.ts";
import { CHECKS } from "../../src/compliance/checks.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** The bin as a user runs it. */
function runBin(...argv: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [path.join(ROOT, "src/cli/vfio-user-ts.mjs"), ...argv], { cwd: ROOT, timeout: 60_000 }, (e, out, err) =>
      resolve({ code: e === null ? 0 : typeof e.code === "number" ? e.code : null, out, err }),
    );
  });
}

/** checkCommand in process, its output collected (the bin prints the same: see the last tests). */
async function run(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const code = await checkCommand(argv, { out: (l) => out.push(l), err: (l) => err.push(l) });
  return { code, out: out.join("\n"), err: err.join("\n") };
}

describe("vfio-user-ts check", () => {
  it("--help prints the usage and exits 0", async () => {
    const r = await run("--help");
    expect(r.code).toBe(0);
    expect(r.out).toBe(CHECK_USAGE);
    expect(r.out).toMatch(/--device NAME/);
    expect(r.out).toMatch(/Exit status: 0 when every check passed, 1 when one failed, 2 on a usage error/);
  });

  it("--list names every check", async () => {
    const r = await run("--list");
    expect(r.code).toBe(0);
    expect(r.out.split("\n").map((l) => l.split(/\s+/)[0])).toEqual(CHECKS.map((c) => c.id));
  });

  it.each([
    [["--device", "nope"], `vfio-user-ts: unknown device 'nope'; known: ${DEVICES.map((d) => d.name).join(", ")} (or a module path like ./my-device.js)`],
    [["--device", "./no-such-device.js"], "vfio-user-ts: device module ./no-such-device.js does not exist"],
    [["--device", "edu", "--opt", "dma-mask=abc"], "vfio-user-ts: edu: dma-mask=abc: 'abc' is not an integer (decimal, or hex with 0x)"],
    [["--device", "edu", "--opt", "frob=1"], "vfio-user-ts: edu: unknown option 'frob' (known: dma-mask)"],
    [["--device", "counter", "--opt", "start=1", "--opt", "start=2"], "vfio-user-ts: --opt start given twice"],
    [[], "vfio-user-ts: check needs --device NAME|PATH"],
    [["--device", "counter", "--opt", "start"], "vfio-user-ts: --opt takes KEY=VALUE, got 'start'"],
    [["--device", "counter", "--opt", "stop=1"], "vfio-user-ts: counter: unknown option 'stop' (known: start)"],
    [["--device", "bigmem", "--opt", "size=3"], "vfio-user-ts: bigmem: size=3: 3 is out of range (4K.."],
    [["--device", "counter", "--only", "everything"], "vfio-user-ts: unknown check 'everything'; known: " + CHECKS.map((c) => c.id).join(", ")],
    [["--device", "counter", "--frobnicate"], "vfio-user-ts: Unknown option '--frobnicate'"],
    [["--device", "counter", "extra"], "vfio-user-ts: Unexpected argument 'extra'"],
  ])("%j is a usage error: %s", async (argv, message) => {
    const r = await run(...argv);
    expect(r.code).toBe(2);
    expect(r.err.split("\n")[0]).toContain(message);
    expect(r.err).toMatch(/Try 'vfio-user-ts check --help'\./);
    expect(r.out).toBe("");
  });

  it("prints PASS per check and a summary, exit 0", async () => {
    const r = await run("--device", "counter", "--opt", "start=3", "--only", "config-identity", "--only", "reset", "-v");
    expect(r.code).toBe(0);
    const lines = r.out.split("\n");
    expect(lines[0]).toBe("vfio-user-ts check: device 'counter', options start=3");
    expect(lines[1]).toMatch(/^PASS {2}config-identity {6}config space identity: .* \(\d+ ms\)$/);
    expect(lines[2]).toMatch(/^PASS {2}reset {16}DEVICE_RESET restores/);
    expect(lines.at(-1)).toBe("2 passed, 0 failed");
  });

  it("is reachable as `vfio-user-ts check` from main() (in process)", async () => {
    const log = vi.spyOn(console, "log").mockImplementation(() => {});
    try {
      expect(await main(["check", "--list"])).toBe(0);
      expect(log.mock.calls.map((c) => String(c[0])).join("\n")).toMatch(/^migration-precopy /m);
      expect(await main(["--help"])).toBe(0);
      expect(log.mock.calls.map((c) => String(c[0])).join("\n")).toMatch(/^ {2}check {6}run the device compliance suite/m);
    } finally {
      log.mockRestore();
    }
  });

  it("the bin prints the same as checkCommand: a usage error (exit 2) and a PASS summary (exit 0)", async () => {
    const bad = await runBin("check", "--device", "nope");
    const badIn = await run("--device", "nope");
    expect(bad.code).toBe(2);
    expect(bad.err.trimEnd()).toBe(badIn.err);
    expect(bad.out).toBe("");
    const good = await runBin("check", "--device", "counter", "--opt", "start=3", "--only", "config-identity", "--only", "reset");
    const goodIn = await run("--device", "counter", "--opt", "start=3", "--only", "config-identity", "--only", "reset");
    expect(good.code, good.err).toBe(0);
    expect(good.out.trimEnd()).toBe(goodIn.out);
    expect(good.out.trimEnd().split("\n").at(-1)).toBe("2 passed, 0 failed");
  }, 60_000);
});
