/**
 * Device lifecycle: `dispose` is called once when the framework lets a
 * device go — the server that attached it closes, or the compliance bench
 * is done with each device it created — so a device with timers or open
 * files lets the process exit.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { runCompliance, VfioUserServer, type DeviceFactory } from "../../src/index.ts";
import { CounterDevice } from "../../devices/tutorial/counter.ts";

/** The tutorial counter plus a running interval timer that only dispose stops. */
class TimerCounter extends CounterDevice {
  timer: NodeJS.Timeout | null = setInterval(() => {}, 1000);
  disposeCalls = 0;
  dispose(): void {
    this.disposeCalls++;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe("Device.dispose", () => {
  it("server.close() disposes the device once, however often it is called, and awaits an async hook", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "vfu-life-"));
    dirs.push(dir);
    const dev = new TimerCounter();
    const server = new VfioUserServer({ device: dev });
    server.listen(path.join(dir, "s.sock"));
    expect(dev.disposeCalls).toBe(0);
    await Promise.all([server.close(), server.close()]);
    await server.close();
    expect(dev.disposeCalls).toBe(1);
    expect(dev.timer).toBeNull();

    let finished = false;
    const slow = new CounterDevice() as CounterDevice & { dispose(): Promise<void> };
    slow.dispose = () => new Promise<void>((resolve) => setTimeout(() => ((finished = true), resolve()), 20));
    const s2 = new VfioUserServer({ device: slow });
    await s2.close();
    expect(finished).toBe(true);
  });

  it("a throwing dispose is logged, not thrown", async () => {
    const dev = new CounterDevice() as CounterDevice & { dispose(): void };
    dev.dispose = () => {
      throw new Error("boom");
    };
    await expect(new VfioUserServer({ device: dev }).close()).resolves.toBeUndefined();
  });

  it("the compliance suite disposes every device it creates (a device with timers lets check finish)", async () => {
    const made: TimerCounter[] = [];
    const factory: DeviceFactory = {
      name: "timer-counter",
      description: "counter with a timer",
      create: () => {
        const d = new TimerCounter();
        made.push(d);
        return d;
      },
    };
    const report = await runCompliance(factory);
    expect(report.passed).toBe(true);
    expect(made.length).toBeGreaterThan(0);
    expect(made.map((d) => d.disposeCalls)).toEqual(made.map(() => 1));
  }, 120_000);
});
