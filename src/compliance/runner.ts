/**
 * runCompliance: every check against a device factory, each with fresh
 * devices on real servers in a temporary directory; a report of what
 * passed and what failed (with every problem found, not just the first).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import type { Logger } from "pino";
import type { DeviceFactory, DeviceOptions } from "../device/api.ts";
import { silentLogger } from "../log.ts";
import { CHECKS, type Check, type CheckContext } from "./checks.ts";
import { DeviceUnderTest } from "./harness.ts";

export interface ComplianceOptions {
  /** Device options, as `--opt key=value` gives them. */
  options?: DeviceOptions;
  /** Run only these check ids (default: all). */
  only?: readonly string[];
  /** Server logs (default: silent). */
  log?: Logger;
  /** Per request (default 10 s). */
  requestTimeoutMs?: number;
  /** Per check (default 120 s). */
  checkTimeoutMs?: number;
  /** Called as each check finishes. */
  onResult?: (result: CheckResult) => void;
}

export interface CheckResult {
  id: string;
  title: string;
  passed: boolean;
  /** Why it failed (empty when it passed). */
  problems: string[];
  /** Information that is not a failure. */
  notes: string[];
  ms: number;
}

export interface ComplianceReport {
  device: string;
  options: DeviceOptions;
  results: CheckResult[];
  passed: boolean;
}

/** Ids of every check, in order. */
export function complianceCheckIds(): string[] {
  return CHECKS.map((c) => c.id);
}

/** Runs one check; never throws (an exception is a failure). */
async function runCheck(check: Check, factory: DeviceFactory, opts: Required<Pick<ComplianceOptions, "requestTimeoutMs" | "checkTimeoutMs">> & { options: DeviceOptions; log: Logger }): Promise<CheckResult> {
  const started = performance.now();
  const problems: string[] = [];
  const notes: string[] = [];
  const benches: DeviceUnderTest[] = [];
  const dir = mkdtempSync(path.join(tmpdir(), "vfio-user-check-"));
  const ctx: CheckContext = {
    factory,
    options: opts.options,
    log: opts.log.child({ check: check.id }),
    start(name) {
      const dut = new DeviceUnderTest({
        factory,
        options: opts.options,
        dir,
        name,
        log: opts.log.child({ check: check.id }),
        requestTimeoutMs: opts.requestTimeoutMs,
      });
      benches.push(dut);
      return dut;
    },
    fail: (m) => void problems.push(m),
    note: (m) => void notes.push(m),
  };
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      check.run(ctx),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`did not finish within ${opts.checkTimeoutMs} ms`)), opts.checkTimeoutMs);
      }),
    ]);
  } catch (err) {
    problems.push(`${(err as Error).message}`);
  } finally {
    clearTimeout(timer);
    for (const b of benches) {
      try {
        await b.close();
      } catch (err) {
        notes.push(`closing ${b.socket}: ${(err as Error).message}`);
      }
    }
    rmSync(dir, { recursive: true, force: true });
  }
  return { id: check.id, title: check.title, passed: problems.length === 0, problems, notes, ms: performance.now() - started };
}

/**
 * Runs the compliance checks against devices made by `factory` (several
 * instances: each check starts its own). Creating the device must work
 * with `options`; otherwise this throws before any check runs.
 */
export async function runCompliance(factory: DeviceFactory, options: ComplianceOptions = {}): Promise<ComplianceReport> {
  const devOptions = options.options ?? {};
  // fail early and plainly on bad options
  await factory.create(devOptions).dispose?.();
  const unknown = (options.only ?? []).filter((id) => !CHECKS.some((c) => c.id === id));
  if (unknown.length > 0) throw new Error(`unknown check${unknown.length > 1 ? "s" : ""} ${unknown.join(", ")}; known: ${complianceCheckIds().join(", ")}`);
  const checks = options.only && options.only.length > 0 ? CHECKS.filter((c) => options.only!.includes(c.id)) : CHECKS;
  const results: CheckResult[] = [];
  for (const check of checks) {
    const r = await runCheck(check, factory, {
      options: devOptions,
      log: options.log ?? silentLogger(),
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      checkTimeoutMs: options.checkTimeoutMs ?? 120_000,
    });
    results.push(r);
    options.onResult?.(r);
  }
  return { device: factory.name, options: devOptions, results, passed: results.every((r) => r.passed) };
}

/** One line per check (and indented problems and notes), as `vfio-user-ts check` prints them. */
export function formatCheckResult(r: CheckResult, verbose = false): string {
  const width = Math.max(...CHECKS.map((c) => c.id.length));
  const lines = [`${r.passed ? "PASS" : "FAIL"}  ${r.id.padEnd(width)}  ${r.title}${verbose ? ` (${Math.round(r.ms)} ms)` : ""}`];
  for (const p of r.problems) lines.push(`      - ${p}`);
  if (verbose) for (const n of r.notes) lines.push(`      note: ${n}`);
  return lines.join("\n");
}

/** A human summary of a whole report. */
export function formatComplianceReport(report: ComplianceReport, verbose = false): string {
  const failed = report.results.filter((r) => !r.passed).length;
  return [
    ...report.results.map((r) => formatCheckResult(r, verbose)),
    `${report.results.length - failed} passed, ${failed} failed`,
  ].join("\n");
}
