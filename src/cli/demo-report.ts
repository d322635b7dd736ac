/**
 * How `demo migrate` shows a migration: one unit per line (the line's
 * largest figure picks it), a per-round table whose columns add up to the
 * totals, a bar chart in the terminal, and an optional SVG (bytes per
 * round, dirty guest pages per round, the downtime and where it went).
 *
 * What a round's figures mean: round N sends what pre-copy info reported
 * at its start (initial bytes not yet sent + bytes dirtied before it) plus
 * what the device dirtied while the round was reading ("during": the reads
 * go on until the round's budget is met, so the last chunk carries some),
 * and the guest pages dirtied since round N-1; what was dirtied during
 * round N and not sent shows as round N+1's dirty figures, and after the
 * last round as the stop-copy row.
 */
import type { MigrationResult } from "../client/migration-driver.ts";

const PAGE = 4096;

/** A unit for a line: the one that keeps its largest figure readable. */
export function unitFor(maxBytes: number): { name: "B" | "KiB" | "MiB" | "GiB"; div: number } {
  if (maxBytes >= 1 << 30) return { name: "GiB", div: 1 << 30 };
  if (maxBytes >= 1 << 20) return { name: "MiB", div: 1 << 20 };
  if (maxBytes >= 1 << 10) return { name: "KiB", div: 1 << 10 };
  return { name: "B", div: 1 };
}

/** Formats several byte counts in one unit: `fmt([a, b])` -> ["1.5", "0.2", "MiB"]. */
export function inUnit(values: readonly number[]): { figures: string[]; unit: string } {
  const u = unitFor(Math.max(0, ...values));
  return { figures: values.map((v) => (u.div === 1 ? String(v) : (v / u.div).toFixed(1))), unit: u.name };
}

/** One size with its unit. */
export function bytes(n: number | bigint): string {
  const { figures, unit } = inUnit([Number(n)]);
  return `${figures[0]} ${unit}`;
}

/** 10^6 bytes per second, one decimal. */
export function mbps(byteCount: number, ms: number): string {
  return ms > 0 ? (byteCount / 1e6 / (ms / 1000)).toFixed(1) : "-";
}

/** One row of the table: a pre-copy round, or the stop-copy. */
export interface ReportRow {
  label: string;
  /** Device stream bytes moved. */
  deviceBytes: number;
  /** Of those: pre-copy info's initial and dirty bytes when the round started (stop-copy: undefined). */
  initialBytes?: number;
  dirtyBytes?: number;
  /** Guest RAM pages copied (the first round: all of RAM; then the pages dirtied since the previous round). */
  guestPages: number;
  ms: number;
}

export function reportRows(m: MigrationResult): ReportRow[] {
  const rows: ReportRow[] = m.rounds.map((r) => ({
    label: `round ${r.round}`,
    deviceBytes: r.deviceBytes,
    initialBytes: Number(r.initialBytes),
    dirtyBytes: Number(r.dirtyBytes),
    guestPages: r.guestPages,
    ms: r.elapsedMs,
  }));
  const d = m.downtime;
  rows.push({ label: "stop-copy", deviceBytes: m.stopCopyDeviceBytes, guestPages: m.finalGuestPages, ms: d.stopCopyMs + d.drainMs + d.guestMs });
  return rows;
}

/** The per-round table (one unit per column group) with a total row that is the sum of the rows above it. */
export function reportTable(m: MigrationResult): string[] {
  const rows = reportRows(m);
  // one unit per column group: device state (sent = initial + dirty), guest RAM
  const du = unitFor(Math.max(m.deviceBytes, ...rows.flatMap((r) => [r.initialBytes ?? 0, r.dirtyBytes ?? 0])));
  const gu = unitFor(m.guestBytes);
  const f = (v: number | undefined, u: { div: number }) => (v === undefined ? "" : u.div === 1 ? String(v) : (v / u.div).toFixed(1));
  const head = ["", `device (${du.name})`, "= initial", "+ dirty", "+ during", "guest pages", `guest (${gu.name})`, "ms", "MB/s"];
  const during = (r: ReportRow) => (r.initialBytes === undefined ? undefined : r.deviceBytes - r.initialBytes - (r.dirtyBytes ?? 0));
  const body = rows.map((r) => [
    r.label,
    f(r.deviceBytes, du),
    f(r.initialBytes, du),
    f(r.dirtyBytes, du),
    f(during(r), du),
    String(r.guestPages),
    f(r.guestPages * PAGE, gu),
    r.ms.toFixed(0),
    mbps(r.deviceBytes + r.guestPages * PAGE, r.ms),
  ]);
  const totalMs = rows.reduce((s, r) => s + r.ms, 0);
  const guestPages = rows.reduce((s, r) => s + r.guestPages, 0);
  body.push(["total", f(m.deviceBytes, du), "", "", "", String(guestPages), f(m.guestBytes, gu), totalMs.toFixed(0), mbps(m.totalBytes, totalMs)]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ").trimEnd();
  return [line(head), ...body.map(line)];
}

/** A horizontal bar chart of device + guest bytes per round (█ device, ░ guest RAM). */
export function reportChart(m: MigrationResult, width = 40): string[] {
  const rows = reportRows(m);
  const totals = rows.map((r) => r.deviceBytes + r.guestPages * PAGE);
  const max = Math.max(1, ...totals);
  const u = unitFor(max);
  const labelW = Math.max(...rows.map((r) => r.label.length));
  const out = [`bytes moved per round (${u.name}; █ device state, ░ guest RAM)`];
  rows.forEach((r, i) => {
    const dev = Math.round((r.deviceBytes / max) * width);
    const guest = Math.round(((r.guestPages * PAGE) / max) * width);
    const bar = "█".repeat(dev) + "░".repeat(guest) || (totals[i]! > 0 ? "▏" : "");
    out.push(`  ${r.label.padEnd(labelW)} ${bar.padEnd(width)} ${(totals[i]! / u.div).toFixed(1)}`);
  });
  return out;
}

function esc(s: string): string {
  return s.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
}

/** The SVG: device bytes per round, dirty guest pages per round, the downtime breakdown. */
export function reportSvg(m: MigrationResult, title: string): string {
  const rows = reportRows(m);
  const W = 720;
  const left = 90;
  const barW = W - left - 110;
  const rowH = 22;
  const parts: string[] = [];
  let y = 30;
  parts.push(`<text x="10" y="${y}" font-size="16" font-weight="bold">${esc(title)}</text>`);
  const panel = (heading: string, values: number[], label: (v: number) => string, color: string) => {
    y += 30;
    parts.push(`<text x="10" y="${y}" font-size="13" font-weight="bold">${esc(heading)}</text>`);
    const max = Math.max(1, ...values);
    rows.forEach((r, i) => {
      y += rowH;
      const w = Math.max(values[i]! > 0 ? 1 : 0, Math.round((values[i]! / max) * barW));
      parts.push(`<text x="10" y="${y + 14}" font-size="12">${esc(r.label)}</text>`);
      parts.push(`<rect x="${left}" y="${y + 3}" width="${w}" height="${rowH - 6}" fill="${color}"/>`);
      parts.push(`<text x="${left + w + 6}" y="${y + 14}" font-size="12">${esc(label(values[i]!))}</text>`);
    });
    y += 10;
  };
  const devUnit = unitFor(Math.max(...rows.map((r) => r.deviceBytes)));
  panel(`device state sent per round (${devUnit.name})`, rows.map((r) => r.deviceBytes), (v) => (v / devUnit.div).toFixed(1), "#3b6ea5");
  panel("guest RAM pages copied per round (round 1: all of RAM; then the pages dirtied since)", rows.map((r) => r.guestPages), String, "#d08c2e");
  // downtime: one stacked bar
  y += 30;
  const d = m.downtime;
  const pieces: [string, number, string][] = [
    ["stop", d.stopCopyMs, "#8c564b"],
    ["drain", d.drainMs, "#3b6ea5"],
    ["guest pages", d.guestMs, "#d08c2e"],
    ["destination load", d.loadMs, "#2ca02c"],
    ["start", d.startMs, "#9467bd"],
  ];
  parts.push(`<text x="10" y="${y}" font-size="13" font-weight="bold">downtime ${m.downtimeMs.toFixed(1)} ms (STOP_COPY request to destination RUNNING)</text>`);
  y += 12;
  let x = left;
  for (const [name, ms, color] of pieces) {
    const w = m.downtimeMs > 0 ? (ms / m.downtimeMs) * barW : 0;
    parts.push(`<rect x="${x.toFixed(1)}" y="${y}" width="${w.toFixed(1)}" height="18" fill="${color}"><title>${esc(name)} ${ms.toFixed(1)} ms</title></rect>`);
    x += w;
  }
  y += 36;
  x = 10;
  for (const [name, ms, color] of pieces) {
    parts.push(`<rect x="${x}" y="${y - 10}" width="10" height="10" fill="${color}"/><text x="${x + 14}" y="${y}" font-size="11">${esc(name)} ${ms.toFixed(1)} ms</text>`);
    x += 140;
  }
  y += 20;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${y}" viewBox="0 0 ${W} ${y}" font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n${parts.join("\n")}\n</svg>\n`;
}
