/** demo migrate beyond bigmem's defaults: any device, the smallest bigmem, the report and the SVG. */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { runDemoMigrate } from "../../src/cli/demo-migrate.ts";
import { reportRows, reportTable } from "../../src/cli/demo-report.ts";

const dir = mkdtempSync(path.join(tmpdir(), "vfu-demo-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("demo migrate", () => {
  it("migrates the tutorial device and compares its state record by record before it runs", async () => {
    const lines: string[] = [];
    const svg = path.join(dir, "counter.svg");
    const r = await runDemoMigrate({ device: "counter", deviceOptions: { start: "7" }, ram: 4n << 20n, svg, print: (l) => lines.push(l) });
    expect(r.error, lines.join("\n")).toBeUndefined();
    expect(r.checks.map((c) => c.name)).toEqual(["device state", "config space", "guest RAM", "destination device runs"]);
    for (const c of r.checks) expect(c.ok, `${c.name}: ${c.detail}`).toBe(true);
    expect(lines).toContain("migration verified");
    expect(lines.some((l) => /^guest: memory \+ bus master on, MSI on; 256 dwords written in BAR 0$/.test(l))).toBe(true);
    const text = readFileSync(svg, "utf8");
    expect(text).toMatch(/^<svg xmlns="http:\/\/www.w3.org\/2000\/svg"/);
    expect(text).toContain("downtime");
  }, 60_000);

  it("--size 4K works (the smallest bigmem), and the table's rows add up to its totals", async () => {
    const lines: string[] = [];
    const r = await runDemoMigrate({ size: "4K", ram: 4n << 20n, print: (l) => lines.push(l) });
    expect(r.error, lines.join("\n")).toBeUndefined();
    expect(r.ok, lines.join("\n")).toBe(true);
    const m = r.migration!;
    const rows = reportRows(m);
    expect(rows.reduce((s, x) => s + x.deviceBytes, 0)).toBe(m.deviceBytes);
    expect(rows.reduce((s, x) => s + x.guestPages, 0) * 4096).toBe(m.guestBytes);
    const table = reportTable(m);
    expect(table[0]).toMatch(/device \((B|KiB|MiB)\) +\= initial +\+ dirty +\+ during +guest pages +guest \(\w+\) +ms +MB\/s/);
    expect(table.at(-1)).toMatch(/^total /);
    // one unit per line for the figures that add up: rounds, stop-copy, bytes moved
    for (const l of lines.filter((x) => /^(round \d|stop-copy:|  bytes moved)/.test(x))) expect(/KiB/.test(l) && /MiB/.test(l), l).toBe(false);
  }, 60_000);
});
