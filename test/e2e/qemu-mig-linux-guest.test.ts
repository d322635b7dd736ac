/**
 * A real Linux guest (the guest kit's 6.12 kernel, busybox, TCG) migrated by
 * the migrating QEMU while it uses two of our devices, edu and bigmem, each
 * served by its own `vfio-user-ts serve --p2p` process on either side (QEMU
 * migrates more than one VFIO device only when all offer the P2P states).
 *
 * The guest's loop, iteration i: liveness and a factorial on edu through
 * devmem, an edu interrupt raised and waited for through uio_pci_generic
 * (INTx; the event count must be exactly i), a word written into bigmem's
 * memory BAR and read back; `RESULT iter i` per round, `RESULT bad ...` on
 * any wrong value. At the end it reads back every word it wrote into bigmem
 * (before and after the migration) and reports the interrupt count.
 *
 * The test migrates while the guest holds an interrupt it took in iteration
 * MIGRATE_AFTER and lets the guest finish on the destination: the guest
 * holds it until the test, once the migration has completed, types `go` on
 * the destination's serial console (no fixed hold time that a slow migration
 * could outlast). The iterations printed by both
 * consoles together must be 1..N exactly once, in order, with no wrong
 * value, every bigmem word intact and exactly N interrupts.
 */
import { afterAll, beforeAll, expect, it } from "vitest";
import { describeQemuMig } from "./harness/describe-qemu.ts";
import { GUEST_PRELUDE, guestKit, parseResults, type GuestKitStatus } from "./harness/linux-guest.ts";
import { makeInitrd, startLinuxVm, type LinuxVm } from "./harness/linux-vm.ts";
import { describeMigration, startMigration } from "./harness/migrate.ts";
import { states } from "./harness/mig-pair.ts";
import { makeSharedDir, type SharedDir } from "./harness/shared-dir.ts";
import { spawnCliServer, type CliServer } from "./harness/server.ts";

const ITERATIONS = 60;
/**
 * In this iteration the guest holds edu's interrupt unacknowledged (taken,
 * INTx masked by uio's handler, not yet acked) until the test says `go` on
 * the console, and the test migrates then: the destination must take over an INTx the
 * source's client still held (a migrating QEMU restores the line as asserted
 * but not vfio's record of having taken it; without a fresh signal the line
 * never drops and the guest takes an interrupt storm).
 */
const MIGRATE_AFTER = 12;
/** The guest gives up waiting for `go` after this long (then reports it as a wrong value). */
const GO_TIMEOUT_S = 900;

const GUEST_INIT = `${GUEST_PRELUDE}
pci_find 0x1234 0xb16e
BAR2=$(sed -n 3p "$DEV/resource" | cut -d' ' -f1)
result bar2 "$BAR2"
pci_find 0x1234 0x11e8
BAR=$(bar_base)
result bar0 "$BAR"
insmod /lib/modules/uio.ko || fail "insmod uio"
insmod /lib/modules/uio_pci_generic.ko || fail "insmod uio_pci_generic"
echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/new_id || fail "new_id"
UIO=$(ls "$DEV/uio" 2>/dev/null | head -n 1)
[ -n "$UIO" ] || fail "uio_pci_generic did not bind"
exec 3< "/dev/$UIO"
fact() { f=1; k=$1; while [ $k -gt 1 ]; do f=$(( (f * k) & 0xffffffff )); k=$((k - 1)); done; echo $f; }
big_wr() { devmem "$(printf 0x%x $((BAR2 + $1)))" 32 "$2"; }
big_rd() { devmem "$(printf 0x%x $((BAR2 + $1)))" 32; }
word() { echo $(( ($1 * 2654435761) & 0xffffffff )); }
N=${ITERATIONS}
i=1
while [ $i -le $N ]; do
  v=$(word $i)
  wr 0x04 $v
  got=$(rd 0x04); want=$(printf 0x%08X $(( ~v & 0xffffffff )))
  [ "$got" = "$want" ] || result bad "$i liveness $got want $want"
  n=$(( i % 12 + 1 ))
  wr 0x08 $n
  j=0
  while [ $(( $(rd 0x20) & 1 )) -ne 0 ]; do j=$((j + 1)); [ $j -lt 5000 ] || break; done
  got=$(( $(rd 0x08) )); want=$(fact $n)
  [ "$got" = "$want" ] || result bad "$i factorial($n) $got want $want"
  wr 0x60 0x1
  ev=$(wait_uio 3 20)
  [ "$ev" = "$i" ] || result bad "$i interrupt event count '$ev' want $i"
  if [ $i -eq ${MIGRATE_AFTER} ]; then
    result holding "$i"
    go=""
    read -t ${GO_TIMEOUT_S} -r go || true
    [ "$go" = "go" ] || result bad "$i no go from the test within ${GO_TIMEOUT_S} s (read '$go')"
    result released "$i"
  fi
  wr 0x64 0x1
  intx_enable
  irqs=$(uio_irqs)
  [ "$irqs" = "$i" ] || result bad "$i interrupts counted on the line: $irqs want $i ($(grep uio_pci_generic /proc/interrupts); spurious: $(tr '\n' ' ' < /proc/irq/$(cat "$DEV/irq")/spurious))"
  big_wr $((i * 4096)) $v
  got=$(big_rd $((i * 4096))); want=$(printf 0x%08X $v)
  [ "$got" = "$want" ] || result bad "$i bigmem $got want $want"
  result iter "$i"
  i=$((i + 1))
done
ok=0
k=1
while [ $k -le $N ]; do
  [ "$(big_rd $((k * 4096)))" = "$(printf 0x%08X $(word $k))" ] && ok=$((ok + 1))
  k=$((k + 1))
done
result bigmem_words_ok "$ok"
result uio_irqs "$(uio_irqs)"
exec 3<&-
finish
`;

describeQemuMig("a Linux guest keeps using edu and bigmem while QEMU migrates it", () => {
  let kit: GuestKitStatus = { ok: false, why: "not checked" };
  let dir: SharedDir;
  const servers: CliServer[] = [];
  const vms: LinuxVm[] = [];

  beforeAll(() => {
    kit = guestKit("mig");
    dir = makeSharedDir("vfu-lgmig-", "mig");
  });
  afterAll(async () => {
    await Promise.all(vms.map((v) => v.stop()));
    await Promise.all(servers.map((s) => s.stop()));
    dir?.cleanup();
  });

  it("the guest's loop continues on the destination with nothing lost: iterations 1..N once each, no wrong value, every interrupt, and an INTx held across the switch-over raises no storm", async (ctx) => {
    if (!kit.ok) {
      if (process.env.VFIO_USER_REQUIRE_QEMU_MIG === "1") throw new Error(`guest kit of the migrating QEMU's root unavailable: ${kit.why}`);
      ctx.skip(kit.why);
      return;
    }
    const serve = async (name: string, device: string, extra: string[] = []) => {
      const s = await spawnCliServer({ dir, name, device, args: ["--p2p", "--trace", "--log-level", "debug", ...extra] });
      servers.push(s);
      return s;
    };
    const [eduA, bigA, eduB, bigB] = [
      await serve("edu-a.sock", "edu"),
      await serve("big-a.sock", "bigmem", ["--opt", "size=16M"]),
      await serve("edu-b.sock", "edu"),
      await serve("big-b.sock", "bigmem", ["--opt", "size=16M"]),
    ];
    const initrd = makeInitrd(dir, kit.kit, GUEST_INIT);
    const devices = (edu: CliServer, big: CliServer) => [
      { socket: edu.socketPath, props: { id: "edu0", addr: "4.0" } },
      { socket: big.socketPath, props: { id: "big0", addr: "5.0" } },
    ];
    const src = await startLinuxVm({ dir, qemu: "mig", kit: kit.kit, initrd, devices: devices(eduA, bigA), input: true });
    vms.push(src);
    const irqTraffic = (srv: CliServer) => {
      const recs = srv.log.records();
      const sets = recs.filter((r) => r.msg === "recv" && r.cmd === "DEVICE_SET_IRQS").length;
      return `${sets} SET_IRQS received; last lines: ${srv.log.raw().filter((l) => !/"msg":"(recv|send)"/.test(l)).slice(-8).join("\n")}`;
    };
    const context = () =>
      `--- edu server A ---\n${irqTraffic(eduA)}\n--- edu server B ---\n${irqTraffic(eduB)}\n` +
      `--- source console ---\n${src.lines().slice(-30).join("\n")}${src.partial()}\n--- source stderr ---\n${src.stderr().slice(-2000)}` +
      (vms[1] ? `\n--- destination console ---\n${vms[1].lines().slice(-30).join("\n")}\n--- destination stderr ---\n${vms[1].stderr().slice(-2000)}` : "");
    try {
      // boot under TCG and the first iterations: a generous deadline (a loaded machine), not a speed claim
      await src.waitLine(new RegExp(`^RESULT holding ${MIGRATE_AFTER}$`), 300_000);
      const dst = await startLinuxVm({ dir, qemu: "mig", kit: kit.kit, initrd, devices: devices(eduB, bigB), incoming: true, input: true });
      vms.push(dst);
      const marks = [eduA, bigA, eduB, bigB].map((s) => s.log.length);
      const m = await startMigration(src, dst, dir);
      // waits while the stream grows; fails if it stalls for 90 s or has not ended in 7 min
      const r = await m.finish(420_000, { stallMs: 90_000 });
      console.log(`[qemu-mig linux] ${describeMigration(r)}`);
      expect(r.status).toBe("completed");
      await dst.qmp.waitEvent("RESUME", 60_000);
      // the guest, now on the destination, may let go of the interrupt
      dst.type("go");
      await dst.waitLine(new RegExp(`^RESULT released ${MIGRATE_AFTER}$`), 120_000);
      await dst.waitLine(/^RESULT done /, 300_000);

      // the two consoles as one: the source's output, its unfinished line, then the destination's
      const text = `${src.lines().join("\n")}\n${src.partial()}${dst.lines().join("\n")}\n`;
      const results = parseResults(text);
      const iters = results.filter((x) => x.name === "iter").map((x) => Number(x.value));
      const bad = results.filter((x) => x.name === "bad" || x.name === "error").map((x) => `${x.name} ${x.value}`);
      const lastOnSource = Math.max(...parseResults(src.lines().join("\n")).filter((x) => x.name === "iter").map((x) => Number(x.value)));
      const firstOnDest = parseResults(dst.lines().join("\n")).find((x) => x.name === "iter");
      const fin = Object.fromEntries(results.map((x) => [x.name, x.value]));
      console.log(
        `[qemu-mig linux] source printed iterations 1..${lastOnSource}, destination from ${firstOnDest?.value ?? "-"} to ${iters.at(-1)}; ` +
          `bigmem words intact ${fin.bigmem_words_ok}/${ITERATIONS}, uio interrupts ${fin.uio_irqs}, wrong values: ${bad.length ? bad.join("; ") : "none"}`,
      );
      console.log(`[qemu-mig linux] states: edu A ${states(eduA, marks[0]).join(", ")}; bigmem A ${states(bigA, marks[1]).join(", ")}; edu B ${states(eduB, marks[2]).join(", ")}; bigmem B ${states(bigB, marks[3]).join(", ")}`);
      expect(bad).toEqual([]);
      expect(iters).toEqual(Array.from({ length: ITERATIONS }, (_, k) => k + 1));
      // the migration happened while the guest held iteration MIGRATE_AFTER's interrupt
      expect(lastOnSource).toBe(MIGRATE_AFTER - 1);
      expect(firstOnDest?.value).toBe(String(MIGRATE_AFTER));
      expect(fin.bigmem_words_ok).toBe(String(ITERATIONS));
      expect(fin.uio_irqs).toBe(String(ITERATIONS));
      for (const [s, mark] of [
        [eduA, marks[0]],
        [bigA, marks[1]],
      ] as const) {
        expect(states(s, mark)).toEqual(["RUNNING->PRE_COPY", "PRE_COPY->PRE_COPY_P2P", "PRE_COPY_P2P->STOP_COPY", "STOP_COPY->STOP"]);
        expect(s.problems(mark)).toEqual([]);
      }
      for (const [s, mark] of [
        [eduB, marks[2]],
        [bigB, marks[3]],
      ] as const) {
        expect(states(s, mark)).toEqual(["RUNNING->RESUMING", "RESUMING->RUNNING_P2P", "RUNNING_P2P->RUNNING"]);
        expect(s.problems(mark)).toEqual([]);
      }
    } catch (e) {
      if (e instanceof Error) e.message += `\n${context()}`;
      throw e;
    }
  }, 1_000_000);
});
