/**
 * The CI line (`N passed, M failed`, test/ci/report-line.mjs) and the script
 * that prints it (test/run-all.sh):
 *
 * - a test file that throws at import time counts as a failure even when
 *   another file has a failed test (vitest run for real on fixtures in
 *   test/ci/fixtures, which the main run does not include);
 * - a report left by an earlier run is deleted before vitest starts, so a
 *   run that writes none says `0 passed, 1 failed`, not the old numbers;
 * - a failed setup, a garbled report and an unhandled error each end with a
 *   line that counts a failure.
 *
 * run-all.sh runs in a scratch copy of the repository (its script, the
 * report script, the fixtures, node_modules linked) with `npx`, `id` and the
 * docker/ setup scripts replaced by stubs, so no QEMU is built and the real
 * test-results/ is never touched.
 */
import { execFile } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tally } from "../../ci/report-line.mjs";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const VITEST = join(ROOT, "node_modules/vitest/vitest.mjs");
const FIXTURE_CONFIG = "test/ci/fixtures/vitest.fixtures.config.mjs";

let scratch: string;

interface Run {
  code: number | null;
  out: string;
  lastLine: string;
}

function run(file: string, args: string[], opts: { cwd: string; env?: NodeJS.ProcessEnv; timeoutMs?: number }): Promise<Run> {
  return new Promise((resolvePromise) => {
    execFile(file, args, { cwd: opts.cwd, env: { ...process.env, ...opts.env }, timeout: opts.timeoutMs ?? 90_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const out = `${stdout}${stderr ? `\n--- stderr ---\n${stderr}` : ""}`;
      const lines = stdout.trimEnd().split("\n");
      const code = err === null ? 0 : typeof err.code === "number" ? err.code : null;
      resolvePromise({ code, out, lastLine: lines[lines.length - 1] ?? "" });
    });
  });
}

/** A minimal valid vitest report with these counts and per-file results. */
function report(passed: number, failed: number, files: unknown[] = []): string {
  return JSON.stringify({ numPassedTests: passed, numFailedTests: failed, numPendingTests: 0, numTodoTests: 0, testResults: files });
}

const STUB_NPX = `#!/bin/sh
# stub npx for run-all.sh: tsc as told, vitest as told (real, crash, garbled, unhandled)
case "$1" in
  tsc) exit "\${STUB_TSC_STATUS:-0}" ;;
  vitest) shift ;;
  *) echo "stub npx: unexpected $*" >&2; exit 127 ;;
esac
out=
for a in "$@"; do case $a in --outputFile=*) out=\${a#--outputFile=} ;; esac; done
case "\${STUB_VITEST:-real}" in
  real) exec node "$REAL_VITEST" "$@" ;;
  crash) echo "stub vitest: died before writing a report" >&2; exit 1 ;;
  garbled) mkdir -p "$(dirname "$out")"; printf '{"numPassedTests": 7, "numFa' > "$out"; exit 1 ;;
  unhandled) mkdir -p "$(dirname "$out")"; printf '%s' '${report(4, 0)}' > "$out"; exit 1 ;;
esac
`;

const STUB_ID = `#!/bin/sh
if [ "$1" = -u ]; then echo "\${STUB_UID:-1000}"; exit 0; fi
exec /usr/bin/id "$@"
`;

beforeAll(() => {
  scratch = mkdtempSync(join(tmpdir(), "vfu-report-line-"));
  for (const d of ["test/ci/fixtures", "docker", "bin"]) mkdirSync(join(scratch, d), { recursive: true });
  copyFileSync(join(ROOT, "test/run-all.sh"), join(scratch, "test/run-all.sh"));
  copyFileSync(join(ROOT, "test/ci/report-line.mjs"), join(scratch, "test/ci/report-line.mjs"));
  for (const f of ["pass.fixture.ts", "fail.fixture.ts", "load-error.fixture.ts", "vitest.fixtures.config.mjs"]) {
    copyFileSync(join(ROOT, "test/ci/fixtures", f), join(scratch, "test/ci/fixtures", f));
  }
  writeFileSync(join(scratch, "package.json"), JSON.stringify({ name: "report-line-scratch", private: true, type: "module" }));
  symlinkSync(join(ROOT, "node_modules"), join(scratch, "node_modules"));
  writeFileSync(join(scratch, "docker/qemu-root.sh"), 'echo "stub qemu-root: setup status ${STUB_QEMU_ROOT_STATUS:-0}"; exit "${STUB_QEMU_ROOT_STATUS:-0}"\n');
  writeFileSync(join(scratch, "docker/guest-kit.sh"), "exit 0\n");
  writeFileSync(join(scratch, "docker/qemu-mig.sh"), "exit 3\n");
  writeFileSync(join(scratch, "bin/npx"), STUB_NPX);
  writeFileSync(join(scratch, "bin/id"), STUB_ID);
  chmodSync(join(scratch, "bin/npx"), 0o755);
  chmodSync(join(scratch, "bin/id"), 0o755);
});

afterAll(() => {
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

/** run-all.sh in the scratch repository with the stubs first on PATH. */
function runAll(env: NodeJS.ProcessEnv, args: string[] = []): Promise<Run> {
  return run("bash", ["test/run-all.sh", ...args], {
    cwd: scratch,
    env: { PATH: `${join(scratch, "bin")}:${process.env.PATH ?? ""}`, REAL_VITEST: VITEST, ...env },
  });
}

function plantStaleReport(): string {
  const path = join(scratch, "test-results/vitest.json");
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, report(999, 0));
  return path;
}

describe("report-line.mjs on reports", () => {
  it("counts a file that failed with no test in it, beside a failed test, and says why", () => {
    const dir = mkdtempSync(join(tmpdir(), "vfu-rl-"));
    try {
      const p = join(dir, "r.json");
      writeFileSync(
        p,
        report(3, 1, [
          { name: join(dir, "a.test.ts"), status: "failed", message: "", assertionResults: [{ status: "failed" }, { status: "passed" }] },
          { name: join(dir, "b.test.ts"), status: "failed", message: "Error: boom at import\n    at x", assertionResults: [] },
          { name: join(dir, "c.test.ts"), status: "passed", message: "", assertionResults: [{ status: "passed" }] },
        ]),
      );
      const t = tally([p], { cwd: dir });
      expect(t.line).toBe("3 passed, 2 failed");
      expect(t.notes).toEqual(["b.test.ts failed to load (no tests ran): Error: boom at import"]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("sums several reports; a missing one and a garbled one each count one failure", () => {
    const dir = mkdtempSync(join(tmpdir(), "vfu-rl-"));
    try {
      writeFileSync(join(dir, "a.json"), report(5, 0));
      writeFileSync(join(dir, "b.json"), report(2, 1));
      writeFileSync(join(dir, "bad.json"), '{"numPassedTests": 3');
      writeFileSync(join(dir, "other.json"), JSON.stringify({ hello: 1 }));
      expect(tally([join(dir, "a.json"), join(dir, "b.json")]).line).toBe("7 passed, 1 failed");
      const t = tally([join(dir, "a.json"), join(dir, "missing.json"), join(dir, "bad.json"), join(dir, "other.json")]);
      expect(t.line).toBe("5 passed, 3 failed");
      expect(t.notes.map((n) => n.split(" ")[0])).toEqual(["no", "report", "report"]);
      expect(tally([]).line).toBe("0 passed, 1 failed");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("a non-zero vitest status with a clean report counts one failure (an unhandled error is not in the report)", () => {
    const dir = mkdtempSync(join(tmpdir(), "vfu-rl-"));
    try {
      writeFileSync(join(dir, "a.json"), report(5, 0));
      expect(tally([join(dir, "a.json")], { vitestStatus: 0 }).line).toBe("5 passed, 0 failed");
      expect(tally([join(dir, "a.json")], { vitestStatus: 1 }).line).toBe("5 passed, 1 failed");
      writeFileSync(join(dir, "b.json"), report(5, 2));
      expect(tally([join(dir, "b.json")], { vitestStatus: 1 }).line).toBe("5 passed, 2 failed");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("run-all.sh (scratch copy, stubbed setup)", () => {
  it("real vitest on a passing, a failing and an import-time-throwing fixture: the load failure is counted", async () => {
    const r = await runAll({}, ["--config", FIXTURE_CONFIG]);
    expect(r.out).toMatch(/load-error\.fixture\.ts failed to load \(no tests ran\): .*throws at import time/);
    expect(r.lastLine, r.out).toBe("1 passed, 2 failed");
    expect(r.code, r.out).toBe(1);
    // the report vitest wrote is this run's: three files, the load failure among them
    const rep = JSON.parse(readFileSync(join(scratch, "test-results/vitest.json"), "utf8")) as { testResults: { name: string; status: string; assertionResults: unknown[] }[] };
    expect(rep.testResults.map((f) => [f.name.split("/").pop(), f.status, f.assertionResults.length]).sort()).toEqual([
      ["fail.fixture.ts", "failed", 1],
      ["load-error.fixture.ts", "failed", 0],
      ["pass.fixture.ts", "passed", 1],
    ]);
  }, 120_000);

  it("a stale report is deleted before vitest runs: a run that writes none is 0 passed, 1 failed", async () => {
    const stale = plantStaleReport();
    const r = await runAll({ STUB_VITEST: "crash" });
    expect(r.out).not.toContain("999 passed");
    expect(r.lastLine, r.out).toBe("0 passed, 1 failed");
    expect(r.out).toMatch(/no report test-results\/vitest\.json/);
    expect(existsSync(stale)).toBe(false);
    expect(r.code).toBe(1);
  });

  it("a garbled report is 0 passed, 1 failed", async () => {
    const r = await runAll({ STUB_VITEST: "garbled" });
    expect(r.lastLine, r.out).toBe("0 passed, 1 failed");
    expect(r.out).toMatch(/is not JSON/);
    expect(r.code).toBe(1);
  });

  it("vitest failing with a clean report (an unhandled error) still counts a failure and fails the run", async () => {
    const r = await runAll({ STUB_VITEST: "unhandled" });
    expect(r.lastLine, r.out).toBe("4 passed, 1 failed");
    expect(r.code).toBe(1);
  });

  it("a failed QEMU setup (as root) and a failed typecheck each end with 0 passed, 1 failed", async () => {
    plantStaleReport();
    const setup = await runAll({ STUB_UID: "0", STUB_QEMU_ROOT_STATUS: "1" });
    expect(setup.out).toContain("QEMU root setup failed");
    expect(setup.lastLine, setup.out).toBe("0 passed, 1 failed");
    expect(setup.code).toBe(1);
    const tsc = await runAll({ STUB_TSC_STATUS: "2" });
    expect(tsc.out).toContain("typecheck failed");
    expect(tsc.lastLine, tsc.out).toBe("0 passed, 1 failed");
    expect(tsc.code).toBe(1);
  });

  it("a run stopped by a signal before the tests finish still prints the line", async () => {
    // vitest replaced by a stub that kills its shell's parent (run-all.sh) with SIGTERM
    writeFileSync(join(scratch, "bin/npx"), '#!/bin/sh\n[ "$1" = tsc ] && exit 0\nkill -TERM $PPID\nsleep 1\nexit 1\n');
    try {
      const r = await runAll({});
      expect(r.lastLine, r.out).toBe("0 passed, 1 failed");
      expect(r.code).toBe(143);
    } finally {
      writeFileSync(join(scratch, "bin/npx"), STUB_NPX);
    }
  });
});
