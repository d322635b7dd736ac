/**
 * Device.quiesce: before a running device stops for migration (RUNNING or
 * PRE_COPY to STOP or STOP_COPY), the state machine waits for the device to
 * finish its in-flight work, and only then tells it it stops. Arcs that do
 * not stop a running device do not call it; a rejection fails the arc.
 */
import { afterEach, describe, expect, it } from "vitest";
import { serveDevice } from "./serve-device.ts";
import { MigState } from "../../protocol/constants.ts";
import { CounterDevice } from "../../devices/tutorial/counter.ts";

/** The counter with a quiesce that resolves when the test says so, and a log of hook calls. */
class SlowToStop extends CounterDevice {
  readonly events: string[] = [];
  private finish: (() => void) | null = null;
  failNext = false;

  quiesce(): Promise<void> {
    this.events.push("quiesce");
    if (this.failNext) {
      this.failNext = false;
      return Promise.reject(new Error("in-flight request failed"));
    }
    return new Promise((resolve) => {
      this.finish = () => {
        this.events.push("quiesced");
        resolve();
      };
    });
  }

  /** Resolves the pending quiesce; false if none is pending. */
  done(): boolean {
    const f = this.finish;
    this.finish = null;
    f?.();
    return f !== null;
  }

  override runStateChanged(running: boolean): void {
    this.events.push(running ? "running" : "stopped");
  }
}

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const serve = async (dev: SlowToStop) => (await serveDevice(dev, cleanups)).client;

/** Lets pending I/O and timers run a few times. */
const turns = async (n = 5) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setTimeout(r, 5));
};

describe("Device.quiesce", () => {
  it("RUNNING -> STOP waits for the device's quiesce, then stops it; the reply comes after", async () => {
    const dev = new SlowToStop();
    const client = await serve(dev);
    let replied = false;
    const p = client.setMigState(MigState.STOP).then((r) => ((replied = true), r));
    await turns();
    expect(dev.events).toEqual(["quiesce"]);
    expect(replied).toBe(false);
    expect(dev.done()).toBe(true);
    const r = await p;
    expect(r.deviceState).toBe(MigState.STOP);
    expect(dev.events).toEqual(["quiesce", "quiesced", "stopped"]);
    // STOP -> RUNNING: no quiesce
    await client.setMigState(MigState.RUNNING);
    expect(dev.events.slice(3)).toEqual(["running"]);
  });

  it("PRE_COPY -> STOP_COPY quiesces once; STOP -> RESUMING and RUNNING -> PRE_COPY do not", async () => {
    const dev = new SlowToStop();
    const client = await serve(dev);
    await client.setMigState(MigState.PRE_COPY);
    expect(dev.events).toEqual([]);
    const p = client.setMigState(MigState.STOP_COPY);
    await turns();
    expect(dev.done()).toBe(true);
    await p;
    expect(dev.events).toEqual(["quiesce", "quiesced", "stopped"]);
    await client.setMigState(MigState.STOP);
    await client.setMigState(MigState.RESUMING);
    expect(dev.events).toEqual(["quiesce", "quiesced", "stopped"]);
  });

  it("RUNNING -> STOP_COPY in one request: one quiesce, before the stop-copy state is taken", async () => {
    const dev = new SlowToStop();
    const client = await serve(dev);
    const p = client.setMigState(MigState.STOP_COPY);
    await turns();
    expect(client.closed).toBe(false);
    expect(dev.done()).toBe(true);
    expect((await p).deviceState).toBe(MigState.STOP_COPY);
    expect(dev.events.filter((e) => e === "quiesce")).toEqual(["quiesce"]);
  });

  it("a quiesce that rejects fails the arc: ERROR", async () => {
    const dev = new SlowToStop();
    dev.failNext = true;
    const client = await serve(dev);
    await expect(client.setMigState(MigState.STOP)).rejects.toThrow();
    expect(await client.getMigState()).toBe(MigState.ERROR);
    expect(dev.events).toContain("stopped");
  });
});
