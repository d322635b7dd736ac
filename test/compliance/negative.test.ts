/**
 * The compliance suite catches broken devices: each device here has one
 * deliberate bug, and the checks that must see it fail (with a message that
 * names the problem) while the others still pass.
 */
import { describe, expect, it } from "vitest";
import { BigmemDevice } from "../../devices/bigmem/bigmem.ts";
import { CounterDevice } from "../../devices/tutorial/counter.ts";
import { checkCommand } from "../../src/cli/check.ts";
import { runCompliance, type Device, type DeviceContext, type DeviceFactory, type StateValue } from "../../src/index.ts";

function factory(name: string, create: () => Device): DeviceFactory {
  return { name, description: `broken: ${name}`, create };
}

/** Runs the suite; returns the failed checks' ids and all their problems as one string. */
async function failures(f: DeviceFactory, options = {}): Promise<{ failed: string[]; text: string }> {
  const report = await runCompliance(f, { options });
  const bad = report.results.filter((r) => !r.passed);
  return { failed: bad.map((r) => r.id), text: bad.map((r) => `${r.id}: ${r.problems.join(" | ")}`).join("\n") };
}

/** Reset that forgets to clear COUNT. */
class ForgetfulReset extends CounterDevice {
  override reset(): void {
    const count = (this.saveState() as { count: number }).count;
    super.reset();
    this.loadState({ ...(this.saveState() as object), count });
  }
}

/** loadState that drops ALARM. */
class LossyLoad extends CounterDevice {
  override loadState(state: StateValue): void {
    super.loadState({ ...(state as object), alarm: 0 });
  }
}

/** saveState that loadState cannot read back. */
class UnloadableState extends CounterDevice {
  override saveState(): StateValue {
    return { ...(super.saveState() as object), debugTimestamp: 1 };
  }
}

/** Dirty tracking that loses every page after the first pass. */
class LosesDirtyPages extends BigmemDevice {
  private passes = 0;
  override *takeDirtyPages(): Generator<number, void, undefined> {
    const pages = [...super.takeDirtyPages()];
    if (this.passes++ === 0) yield* pages;
  }
}

/**
 * A device whose definition changes once it is attached: the server built
 * config space from the first, the checks compare with the second.
 */
function changesAfterAttach(patch: Partial<Record<"identity" | "bars" | "capabilities" | "interruptPin", unknown>>): Device {
  const real = new CounterDevice();
  let attached = false;
  return new Proxy(real, {
    get(target, key) {
      if (key === "attach") {
        return (ctx: DeviceContext) => {
          target.attach(ctx);
          attached = true;
        };
      }
      if (attached && typeof key === "string" && key in patch) return (patch as Record<string, unknown>)[key];
      const v = Reflect.get(target, key, target) as unknown;
      return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

describe("the compliance suite catches broken devices", () => {
  it("a reset that leaves a register as it was fails `reset` only", async () => {
    const r = await failures(factory("forgetful-reset", () => new ForgetfulReset()));
    expect(r.failed).toEqual(["reset"]);
    expect(r.text).toMatch(/saveState after reset differs from power-on.*count/);
  });

  it("a loadState that drops a field fails the round trip and both migrations", async () => {
    const r = await failures(factory("lossy-load", () => new LossyLoad()));
    expect(r.failed).toEqual(["state-roundtrip", "migration-stop-copy", "migration-precopy"]);
    expect(r.text).toMatch(/state-roundtrip: .*alarm: 7 vs 0/);
    expect(r.text).toMatch(/migration-stop-copy: device state differs \(source vs destination\): alarm/);
  });

  it("a saveState that loadState refuses fails the round trip and the migrations", async () => {
    const r = await failures(factory("unloadable", () => new UnloadableState()));
    expect(r.failed).toEqual(["state-roundtrip", "migration-stop-copy", "migration-precopy"]);
    expect(r.text).toMatch(/loadState refused what saveState produced: counter: unknown state field "debugTimestamp"/);
    expect(r.text).toMatch(/destination refused the stream/);
  });

  it("pre-copy memory that loses dirty pages fails `migration-precopy` only", async () => {
    const r = await failures(factory("loses-dirty-pages", () => new LosesDirtyPages({ size: "1M" })));
    expect(r.failed).toEqual(["migration-precopy"]);
    expect(r.text).toMatch(/device memory differs in page/);
  });

  it("config space that does not match the definition fails the config checks", async () => {
    const id = await failures(factory("wrong-identity", () => changesAfterAttach({ identity: { vendorId: 0x1234, deviceId: 0xbeef, classCode: 0x020000, revision: 1 } })));
    expect(id.failed).toEqual(["config-identity"]);
    expect(id.text).toMatch(/device ID reads 0xc0de, identity says 0xbeef/);
    expect(id.text).toMatch(/class code reads 0xff0000, identity says 0x020000/);

    const bars = await failures(
      factory("wrong-bars", () => changesAfterAttach({ bars: [{ index: 0, size: 8192n, kind: "mem64", prefetchable: true, read() {}, write() {} }] })),
    );
    expect(bars.failed).toContain("device-info");
    expect(bars.failed).toContain("bar-sizing");
    expect(bars.text).toMatch(/region 0 \(BAR0\) has size 0x1000, the definition says 0x2000/);
    expect(bars.text).toMatch(/BAR0 \(mem64, prefetchable, 0x2000 bytes\): type bits 0x0 after sizing, expected 0xc/);
    expect(bars.text).toMatch(/sizing reads back 0xfffff000, a size of 0x1000; expected 0xffffffffffffe000/);

    const caps = await failures(factory("wrong-caps", () => changesAfterAttach({ capabilities: { pm: true, msi: { vectors: 4 } } })));
    expect(caps.failed).toContain("capability-list");
    expect(caps.text).toMatch(/capability list is \[MSI\], the device declares \[PM, MSI\]/);
    expect(caps.text).toMatch(/MSI capability offers 1 vector\(s\), declared 4/);
  }, 30_000);

  it("`vfio-user-ts check` prints FAIL and exits 1 for a broken device", async () => {
    const out: string[] = [];
    const code = await checkCommand(["--device", "forgetful-reset", "--only", "reset", "--only", "device-info"], { out: (l) => out.push(l), err: (l) => out.push(l) }, [
      factory("forgetful-reset", () => new ForgetfulReset()),
    ]);
    expect(code).toBe(1);
    const text = out.join("\n");
    expect(text).toMatch(/^PASS  device-info /m);
    expect(text).toMatch(/^FAIL  reset /m);
    expect(text).toMatch(/^ {6}- saveState after reset differs/m);
    expect(text).toMatch(/1 passed, 1 failed/);
    expect(text).toMatch(/FAILED: reset/);
  });
});
