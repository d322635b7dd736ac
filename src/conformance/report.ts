/** The conformance report as text: one table per client, as printed when a client leaves and when the server stops. */
import type { ClientReport, ConformanceReport } from "./recorder.ts";

function hex4(n: number): string {
  return `0x${n.toString(16).padStart(4, "0")}`;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

/** One line per deviation under a title line; errors first, then by first appearance. */
export function formatClientReport(r: ClientReport): string[] {
  const title = `client conformance, connection ${r.conn}: ${plural(r.errors, "error")}, ${plural(r.warnings, "warning")} in ${plural(r.messages, "message")}`;
  if (r.deviations.length === 0) return [title];
  const rows = [...r.deviations]
    .sort((a, b) => (a.severity === b.severity ? a.first.message - b.first.message : a.severity === "error" ? -1 : 1))
    .map((d) => [d.severity, d.id, d.command, String(d.count), hex4(d.first.msgId), d.first.offset === null ? "-" : String(d.first.offset), d.section]);
  const head = ["severity", "id", "command", "count", "msgId", "offset", "section"];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === 3 || i === 5 ? c.padStart(widths[i]!) : i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
      .join("  ");
  const out = [title, `  ${line(head)}`];
  for (let i = 0; i < rows.length; i++) out.push(`  ${line(rows[i]!)}`);
  return out;
}

/** Every client's table, then the totals. */
export function formatConformanceReport(r: ConformanceReport): string[] {
  const out: string[] = [];
  for (const c of r.clients) out.push(...formatClientReport(c));
  out.push(`client conformance, all ${plural(r.clients.length, "connection")}: ${plural(r.errors, "error")}, ${plural(r.warnings, "warning")}`);
  return out;
}
