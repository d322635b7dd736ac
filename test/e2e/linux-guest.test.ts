/**
 * A real Linux guest uses our devices: Debian trixie's cloud kernel (6.12)
 * boots under QEMU 11.1.3 / TCG with our vfio-user server attached through
 * vfio-user-pci, and a busybox /init drives the device the way a user would:
 *
 * - finds it in sysfs (vendor/device), takes BAR0's address from `resource`,
 *   and reads and writes registers with `devmem` (/dev/mem);
 * - binds the real `uio_pci_generic` driver through `new_id` and takes INTx
 *   interrupts through it: the driver's handler only claims an interrupt
 *   when PCI status bit 3 is set and then masks INTx in the command register
 *   (the guest re-enables it through sysfs `config`, as uio-howto describes;
 *   uio_pci_generic has no irqcontrol, so a write to /dev/uioN would fail).
 *
 * The guest prints `RESULT name value` lines on ttyS0; the test asserts them.
 * The guest kit (kernel + busybox + uio modules) comes from
 * docker/guest-kit.sh, built here on demand when we are root. Without the kit
 * the tests skip, or fail under VFIO_USER_REQUIRE_QEMU=1.
 */
import { afterEach, beforeAll, expect, it } from "vitest";
import { describeQemu } from "./harness/describe-qemu.ts";
import { makeSharedDir, type SharedDir } from "./harness/shared-dir.ts";
import { startServer, type ServerHandle } from "./harness/server.ts";
import { GUEST_PRELUDE, bootLinuxGuest, ensureGuestKit, resultMap, type GuestKitStatus, type LinuxGuestRun } from "./harness/linux-guest.ts";
import { EDU_ID, EduDevice, eduFactorial } from "../../devices/edu/edu.ts";
import { COUNTER_ID, CounterDevice } from "../../devices/tutorial/counter.ts";

const REQUIRE = process.env.VFIO_USER_REQUIRE_QEMU === "1";
const BOOT_TIMEOUT_MS = 45_000;
const hex32 = (n: number) => `0x${(n >>> 0).toString(16).toUpperCase().padStart(8, "0")}`;

/** edu: identification, liveness, factorial, then INTx twice through uio_pci_generic. */
const EDU_INIT = `${GUEST_PRELUDE}
pci_find 0x1234 0x11e8
result bdf "\${DEV##*/}"
result class "$(cat "$DEV/class")"
result revision "$(cat "$DEV/revision")"
BAR=$(bar_base)
result bar0 "$BAR"
result bar0_size "$(printf 0x%x $(( $(bar_end) - BAR + 1 )))"
result command "$(cfg16 4)"
result id "$(rd 0x00)"
wr 0x04 0x12345678
result liveness "$(rd 0x04)"
wr 0x08 10
i=0
while [ $(( $(rd 0x20) & 1 )) -ne 0 ]; do i=$((i + 1)); [ $i -lt 1000 ] || fail "factorial never finished"; done
result factorial_polls "$i"
result factorial_10 "$(rd 0x08)"
insmod /lib/modules/uio.ko || fail "insmod uio"
insmod /lib/modules/uio_pci_generic.ko || fail "insmod uio_pci_generic"
echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/new_id || fail "new_id"
[ -e "$DEV/driver" ] || fail "uio_pci_generic did not bind"
result driver "$(basename "$(readlink "$DEV/driver")")"
UIO=$(ls "$DEV/uio" | head -n 1)
[ -n "$UIO" ] || fail "no uio device"
result uio "$UIO"
result irq_line "$(cat "$DEV/irq")"
result irqs_before "$(uio_irqs)"
exec 3< "/dev/$UIO"
for round in 1 2; do
  wr 0x60 0x100
  ev=$(wait_uio 3 5)
  [ -n "$ev" ] || fail "no interrupt in round $round"
  result uio_event_$round "$ev"
  result irq_status_$round "$(rd 0x24)"
  result pci_status_$round "$(cfg16 6)"
  result command_in_irq_$round "$(cfg16 4)"
  wr 0x64 0x100
  result irq_status_acked_$round "$(rd 0x24)"
  result pci_status_acked_$round "$(cfg16 6)"
  intx_enable
  result command_reenabled_$round "$(cfg16 4)"
  result irqs_$round "$(uio_irqs)"
done
exec 3<&-
finish
`;

/** The tutorial counter: ID, COUNT/ADD, then the alarm interrupt through uio_pci_generic. */
const COUNTER_INIT = `${GUEST_PRELUDE}
pci_find 0x1234 0xc0de
BAR=$(bar_base)
result bar0 "$BAR"
result bar0_size "$(printf 0x%x $(( $(bar_end) - BAR + 1 )))"
result id "$(rd 0x00)"
wr 0x04 40
wr 0x08 2
result count "$(rd 0x04)"
insmod /lib/modules/uio.ko || fail "insmod uio"
insmod /lib/modules/uio_pci_generic.ko || fail "insmod uio_pci_generic"
echo "1234 c0de" > /sys/bus/pci/drivers/uio_pci_generic/new_id || fail "new_id"
UIO=$(ls "$DEV/uio" 2>/dev/null | head -n 1)
[ -n "$UIO" ] || fail "uio_pci_generic did not bind"
result driver "$(basename "$(readlink "$DEV/driver")")"
result irqs_before "$(uio_irqs)"
exec 3< "/dev/$UIO"
wr 0x0c 50
result irq_status_below "$(rd 0x10)"
wr 0x08 8
ev=$(wait_uio 3 5)
[ -n "$ev" ] || fail "no alarm interrupt"
result uio_event "$ev"
result count_alarm "$(rd 0x04)"
result irq_status "$(rd 0x10)"
result pci_status "$(cfg16 6)"
wr 0x10 1
wr 0x0c 0
result irq_status_cleared "$(rd 0x10)"
result pci_status_cleared "$(cfg16 6)"
intx_enable
result irqs_after "$(uio_irqs)"
exec 3<&-
finish
`;

describeQemu("a Linux guest (TCG) drives our devices through devmem and uio_pci_generic", () => {
  let kit: GuestKitStatus = { ok: false, why: "not checked" };
  let dir: SharedDir | undefined;
  let server: ServerHandle | undefined;

  beforeAll(async () => {
    kit = await ensureGuestKit();
    if (kit.ok) {
      const built = kit.builtMs === undefined ? "cached" : `built in ${Math.round(kit.builtMs)} ms`;
      console.log(`[linux-guest] kit ${kit.kit.dir} (${built}): ${kit.kit.version}`);
    } else {
      console.warn(`[linux-guest] no guest kit: ${kit.why}`);
    }
  }, 600_000);

  afterEach(() => {
    server?.close();
    server = undefined;
    dir?.cleanup();
    dir = undefined;
  });

  /** Boot with `device` served by our server; return the run and its RESULT map. */
  async function boot(ctx: { skip: (note?: string) => void }, device: EduDevice | CounterDevice, init: string, label: string) {
    if (!kit.ok) {
      if (REQUIRE) throw new Error(`guest kit unavailable (VFIO_USER_REQUIRE_QEMU=1): ${kit.why}`);
      ctx.skip(kit.why);
      throw new Error("unreachable");
    }
    dir = makeSharedDir("vfu-linux-");
    server = startServer({ dir, device, trace: false, level: "info" });
    const run = await bootLinuxGuest({ dir, kit: kit.kit, init, vfioUserSocket: server.socketPath, timeoutMs: BOOT_TIMEOUT_MS });
    const lines = run.results.map((r) => `RESULT ${r.name} ${r.value}`).join("\n");
    const t = (ms?: number) => (ms === undefined ? "-" : `${(ms / 1000).toFixed(2)} s`);
    console.log(
      `[linux-guest] ${label}: first RESULT ${t(run.firstResultMs)}, done ${t(run.doneMs)}, QEMU exit ${t(run.totalMs)}` +
        ` (initramfs ${run.initramfsBytes} bytes, exit ${JSON.stringify(run.exit)})\n${lines}`,
    );
    const why = () =>
      `guest console:\n${run.console.slice(-6000)}\nQEMU stderr:\n${run.stderr.slice(-3000)}\nserver log:\n${server?.log.tail(30) ?? ""}\nargs: ${run.args.join(" ")}`;
    return { run, r: resultMap(run.results), why, problems: server.problems() };
  }

  function expectCleanExit(run: LinuxGuestRun, why: () => string): void {
    expect(run.timedOut, why()).toBe(false);
    expect(run.exit, why()).toEqual({ code: 0, signal: null });
    expect(run.results.find((x) => x.name === "error"), why()).toBeUndefined();
    expect(run.results.at(-1)?.name, why()).toBe("done");
  }

  it("edu: sysfs, devmem (id, liveness, factorial) and INTx through uio_pci_generic", async (ctx) => {
    const { run, r, why, problems } = await boot(ctx, new EduDevice(), EDU_INIT, "edu");
    expectCleanExit(run, why);
    // exactly one 1234:11e8 function: ours (QEMU's own edu is not attached)
    expect(r.matches, why()).toBe("1");
    expect(r.class, why()).toBe("0x00ff00");
    expect(r.revision, why()).toBe("0x10");
    expect(BigInt(r.bar0!) % (1n << 20n), why()).toBe(0n);
    expect(r.bar0_size, why()).toBe("0x100000");
    expect(Number(r.command) & 0x2, why()).toBe(0x2); // memory decoding on (firmware)
    // devmem prints uppercase hex
    expect(r.id, why()).toBe(hex32(EDU_ID));
    expect(r.liveness, why()).toBe(hex32(~0x12345678));
    expect(r.factorial_10, why()).toBe(hex32(eduFactorial(10)));
    // uio_pci_generic bound and took the interrupts
    expect(r.driver, why()).toBe("uio_pci_generic");
    expect(r.uio, why()).toMatch(/^uio\d+$/);
    expect(Number(r.irq_line), why()).toBeGreaterThan(0);
    const before = Number(r.irqs_before);
    for (const round of [1, 2]) {
      expect(r[`uio_event_${round}`], why()).toBe(String(round));
      expect(r[`irq_status_${round}`], why()).toBe(hex32(0x100));
      expect(Number(r[`pci_status_${round}`]) & 0x8, why()).toBe(0x8); // interrupt status while asserted
      expect(Number(r[`command_in_irq_${round}`]) & 0x400, why()).toBe(0x400); // the handler masked INTx
      expect(r[`irq_status_acked_${round}`], why()).toBe(hex32(0));
      expect(Number(r[`pci_status_acked_${round}`]) & 0x8, why()).toBe(0); // deasserted on acknowledge
      expect(Number(r[`command_reenabled_${round}`]) & 0x400, why()).toBe(0);
      expect(Number(r[`irqs_${round}`]), why()).toBe(before + round);
    }
    expect(problems, why()).toEqual([]);
  }, 60_000);

  it("tutorial counter: devmem (id, count) and the alarm interrupt through uio_pci_generic", async (ctx) => {
    const { run, r, why, problems } = await boot(ctx, new CounterDevice(), COUNTER_INIT, "counter");
    expectCleanExit(run, why);
    expect(r.matches, why()).toBe("1");
    expect(r.bar0_size, why()).toBe("0x1000");
    expect(r.id, why()).toBe(hex32(COUNTER_ID));
    expect(r.count, why()).toBe(hex32(42));
    expect(r.driver, why()).toBe("uio_pci_generic");
    expect(r.irq_status_below, why()).toBe(hex32(0));
    expect(r.uio_event, why()).toBe("1");
    expect(r.count_alarm, why()).toBe(hex32(50));
    expect(r.irq_status, why()).toBe(hex32(1));
    expect(Number(r.pci_status) & 0x8, why()).toBe(0x8);
    expect(r.irq_status_cleared, why()).toBe(hex32(0));
    expect(Number(r.pci_status_cleared) & 0x8, why()).toBe(0);
    expect(Number(r.irqs_after), why()).toBe(Number(r.irqs_before) + 1);
    expect(problems, why()).toEqual([]);
  }, 60_000);
});
