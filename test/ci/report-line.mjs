#!/usr/bin/env node
/**
 * The last line of a CI run, `N passed, M failed`, from vitest's JSON
 * report(s). Plain Node, no dependencies: it must work when nothing else does.
 *
 *   node test/ci/report-line.mjs [--vitest-status=N] REPORT.json [REPORT.json ...]
 *
 * Counted as failed, besides failed tests:
 * - a test file that failed without a failed test in it: it threw at import
 *   time (no tests at all) or a beforeAll/afterAll hook failed;
 * - a report that is missing, not JSON, or not a vitest report (each one);
 * - vitest exiting non-zero (--vitest-status) when its reports show no
 *   failure, e.g. an unhandled error, which vitest does not put in the report.
 *
 * Why each extra failure was counted goes to stdout before the line, so the
 * line is the last one printed. Skipped tests are reported on a line of their
 * own. Exit code: 0 when the line says 0 failed, 3 when it counts a failure
 * (anything else means this script itself broke and printed no line).
 */
import { readFileSync } from "node:fs";
import { relative } from "node:path";
import { fileURLToPath } from "node:url";

/**
 * @param {string} path
 * @returns {{ ok: true, report: any } | { ok: false, why: string }}
 */
export function readReport(path) {
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    return { ok: false, why: `no report ${path} (${e.code ?? e.message}): vitest did not finish` };
  }
  let report;
  try {
    report = JSON.parse(text);
  } catch (e) {
    return { ok: false, why: `report ${path} is not JSON (${e.message}; ${text.length} bytes)` };
  }
  const numeric = ["numPassedTests", "numFailedTests", "numPendingTests"];
  if (report === null || typeof report !== "object" || !numeric.every((k) => Number.isInteger(report[k])) || !Array.isArray(report.testResults)) {
    return { ok: false, why: `report ${path} is not a vitest JSON report (no ${numeric.join("/")} or testResults)` };
  }
  return { ok: true, report };
}

/**
 * Sums the reports into one tally.
 * @param {string[]} paths
 * @param {{ vitestStatus?: number, cwd?: string }} [opts]
 * @returns {{ passed: number, failed: number, skipped: number, todo: number, notes: string[], line: string }}
 */
export function tally(paths, opts = {}) {
  const cwd = opts.cwd ?? process.cwd();
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  let todo = 0;
  const notes = [];
  if (paths.length === 0) {
    failed += 1;
    notes.push("no report given");
  }
  for (const path of paths) {
    const r = readReport(path);
    if (!r.ok) {
      failed += 1;
      notes.push(r.why);
      continue;
    }
    const rep = r.report;
    passed += rep.numPassedTests;
    failed += rep.numFailedTests;
    skipped += rep.numPendingTests;
    todo += Number.isInteger(rep.numTodoTests) ? rep.numTodoTests : 0;
    for (const file of rep.testResults) {
      if (file?.status !== "failed") continue;
      const tests = Array.isArray(file.assertionResults) ? file.assertionResults : [];
      if (tests.some((t) => t?.status === "failed")) continue; // its failed tests are counted already
      failed += 1;
      const name = typeof file.name === "string" ? relative(cwd, file.name) : "(unnamed file)";
      const what = tests.length === 0 ? "failed to load (no tests ran)" : `failed outside its ${tests.length} tests (a hook?)`;
      const msg = typeof file.message === "string" && file.message !== "" ? `: ${file.message.split("\n")[0]}` : "";
      notes.push(`${name} ${what}${msg}`);
    }
  }
  const status = opts.vitestStatus;
  if (status !== undefined && status !== 0 && failed === 0) {
    failed += 1;
    notes.push(`vitest exited with status ${status} but its report shows no failure (an unhandled error? see vitest's output above)`);
  }
  return { passed, failed, skipped, todo, notes, line: `${passed} passed, ${failed} failed` };
}

function main(argv) {
  let vitestStatus;
  const paths = [];
  for (const a of argv) {
    const m = /^--vitest-status=(-?\d+)$/.exec(a);
    if (m) vitestStatus = Number(m[1]);
    else paths.push(a);
  }
  const t = tally(paths, { vitestStatus });
  for (const n of t.notes) console.log(`report-line: counted as failed: ${n}`);
  if (t.skipped || t.todo) console.log(`report-line: ${t.skipped} skipped${t.todo ? `, ${t.todo} todo` : ""} (not counted)`);
  console.log(t.line);
  return t.failed === 0 ? 0 : 3;
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  try {
    process.exitCode = main(process.argv.slice(2));
  } catch (e) {
    // never leave CI without its line
    console.log(`report-line: ${e?.stack ?? e}`);
    console.log("0 passed, 1 failed");
    process.exitCode = 3;
  }
}
