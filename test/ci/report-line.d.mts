/** Types of report-line.mjs (plain Node, so the test can import it). */
export type ReadResult = { ok: true; report: unknown } | { ok: false; why: string };
export function readReport(path: string): ReadResult;
export interface Tally {
  passed: number;
  failed: number;
  skipped: number;
  todo: number;
  notes: string[];
  line: string;
}
export function tally(paths: string[], opts?: { vitestStatus?: number; cwd?: string }): Tally;
