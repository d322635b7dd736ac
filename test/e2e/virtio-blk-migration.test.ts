/**
 * A Linux guest writing to our virtio-blk is live-migrated by QEMU (the
 * migrating vfio-user client, docker/qemu-mig.sh) from server A to server B,
 * both serving the same raw image (shared storage, as migrations on one host
 * have it):
 *
 * - the guest numbers its blocks: block n is "blk<n>\n" and a fixed filler,
 *   written with O_DIRECT one request each, in a loop that runs before,
 *   during and after the migration, printing its progress;
 * - the loop's length follows the migration, not a guess at how long it
 *   takes: every 10 blocks the guest reads a control block (O_DIRECT), which
 *   the test marks only once the migration has completed and the destination
 *   runs; the guest then writes AFTER more blocks and stops. So a slow
 *   migration (a loaded machine) cannot let the source finish the loop and
 *   power off under it; a guest never told stops at MAX_BLOCKS and the test
 *   says the migration did not complete meanwhile;
 * - QEMU drives VFIO migration: the source device quiesces (requests in
 *   flight complete, the image is flushed) before STOP_COPY, the
 *   destination loads the queues and ring positions and goes on;
 * - after the loop, the guest (now on the destination) drops its caches and
 *   reads everything back with O_DIRECT; its checksum equals the image's;
 *   every block holds its own number; A and B together served exactly one
 *   write request per block (nothing lost, nothing done twice).
 *
 * Reported: blocks written before, during and after the migration, QEMU's
 * downtime, and what each server saw of the migration.
 */
import { createHash } from "node:crypto";
import { closeSync, openSync, readFileSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, expect, it } from "vitest";
import { describeQemuMig } from "./harness/describe-qemu.ts";
import { makeSharedDir, type SharedDir } from "./harness/shared-dir.ts";
import { received, startServer, type ServerHandle } from "./harness/server.ts";
import { GUEST_PRELUDE, ensureGuestKit, parseResults, resultMap, type GuestKitStatus } from "./harness/linux-guest.ts";
import { makeInitrd, startLinuxVm, type LinuxVm } from "./harness/linux-vm.ts";
import { describeMigration, startMigration } from "./harness/migrate.ts";
import { VirtioBlkDevice } from "../../devices/virtio-blk/virtio-blk.ts";

const REQUIRE = process.env.VFIO_USER_REQUIRE_QEMU_MIG === "1";
/** The guest stops here if never told to (the migration did not complete meanwhile). */
const MAX_BLOCKS = 3000;
/** Blocks the guest writes after it sees the control block marked. */
const AFTER = 100;
/** The migration starts once the guest has written this many blocks. */
const START_AT = 150;
const DISK_BYTES = 16 << 20;
/** The control block: the disk's last (beyond MAX_BLOCKS); the test writes STOP_MARK there. */
const CTRL_BLOCK = DISK_BYTES / 4096 - 1;
const STOP_MARK = "vfu-stop";
const MEM_MIB = 256;

const INIT = `${GUEST_PRELUDE}
pci_find 0x1af4 0x1042
insmod /lib/modules/virtio_blk.ko || fail "insmod virtio_blk"
i=0
while [ ! -b /dev/vda ]; do i=$((i + 1)); [ $i -lt 200 ] || fail "no /dev/vda"; sleep 0.05; done
dd if=/dev/urandom of=/tmp/filler bs=4084 count=1 2>/dev/null || fail "filler"
result loop_start
n=0
stop_at=""
while [ $n -lt ${MAX_BLOCKS} ]; do
  { printf 'blk%08d\\n' $n; cat /tmp/filler; } | dd of=/dev/vda bs=4096 count=1 seek=$n iflag=fullblock oflag=direct conv=notrunc 2>/dev/null || fail "write of block $n"
  n=$((n + 1))
  if [ $((n % 10)) -eq 0 ]; then
    result wrote $n
    if [ -z "$stop_at" ] && dd if=/dev/vda bs=4096 count=1 skip=${CTRL_BLOCK} iflag=direct 2>/dev/null | grep -q ${STOP_MARK}; then
      stop_at=$((n + ${AFTER}))
      result told_to_stop $n
    fi
    [ -n "$stop_at" ] && [ $n -ge $stop_at ] && break
  fi
done
result loop_done $n
echo 3 > /proc/sys/vm/drop_caches
result readback_sha "$(dd if=/dev/vda bs=4096 count=$n iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
result filler_sha "$(sha256sum /tmp/filler | cut -d' ' -f1)"
finish
`;

describeQemuMig("live migration of a Linux guest writing to our virtio-blk (migrating QEMU, server A -> server B, one image)", () => {
  let kit: GuestKitStatus = { ok: false, why: "not checked" };
  let dir: SharedDir;
  let a: ServerHandle;
  let b: ServerHandle;
  let devA: VirtioBlkDevice;
  let devB: VirtioBlkDevice;
  let src: LinuxVm | undefined;
  let dst: LinuxVm | undefined;
  let image: string;

  beforeAll(async () => {
    kit = await ensureGuestKit(300_000, "mig");
    if (!kit.ok) return;
    dir = makeSharedDir("vfu-vblk-mig-", "mig");
    image = join(dir.host, "disk.img");
    writeFileSync(image, Buffer.alloc(DISK_BYTES));
    devA = new VirtioBlkDevice({ file: image, serial: "mig-disk" });
    devB = new VirtioBlkDevice({ file: image, serial: "mig-disk" });
    a = startServer({ dir, device: devA, name: "a.sock", level: "info" });
    b = startServer({ dir, device: devB, name: "b.sock", level: "info" });
  }, 600_000);

  afterAll(async () => {
    await Promise.all([src?.stop(), dst?.stop()]);
    await a?.server.close();
    await b?.server.close();
    dir?.cleanup();
  });

  it("the guest's write loop runs through the migration: nothing lost, nothing done twice, read back equal on the destination", async (ctx) => {
    if (!kit.ok) {
      if (REQUIRE) throw new Error(`guest kit for the migrating QEMU unavailable: ${kit.why}`);
      ctx.skip(kit.why);
      return;
    }
    const initrd = makeInitrd(dir, kit.kit, INIT);
    const common = { dir, qemu: "mig" as const, kit: kit.kit, initrd, memMiB: MEM_MIB };
    const props = { id: "vblk0", addr: "4.0" };
    src = await startLinuxVm({ ...common, devices: [{ socket: a.socketPath, props }] });
    dst = await startLinuxVm({ ...common, devices: [{ socket: b.socketPath, props }], incoming: true });
    const why = () =>
      `source console:\n${src!.lines().slice(-30).join("\n")}\ndestination console:\n${dst!.lines().slice(-30).join("\n")}\n` +
      `source stderr:\n${src!.stderr().slice(-2000)}\ndestination stderr:\n${dst!.stderr().slice(-2000)}\nserver A:\n${a.log.tail(30)}\nserver B:\n${b.log.tail(30)}`;

    // boot under TCG and the first blocks: a generous deadline (a loaded machine), not a speed claim
    await src.waitLine(new RegExp(`^RESULT wrote ${START_AT}$`), 300_000).catch((e: Error) => {
      throw new Error(`the source guest did not reach block ${START_AT}: ${e.message}\n${why()}`);
    });
    const mark = { a: a.log.length, b: b.log.length };
    const t0 = performance.now();
    const srcAtStart = src.lines().length;
    const migration = await startMigration(src, dst, dir);
    // waits while the stream grows; fails if it stalls for 90 s or has not ended in 7 min
    const result = await migration.finish(420_000, { stallMs: 90_000 }).catch((e: Error) => {
      throw new Error(`${e.message}\n${why()}`);
    });
    const t1 = performance.now();
    const dstAtEnd = dst.lines().length;
    console.log(`[virtio-blk migration] ${describeMigration(result)}`);
    expect(result.status, `${describeMigration(result)}\n${why()}`).toBe("completed");
    await dst.qmp.waitEvent("RESUME", 60_000).catch((e: Error) => {
      throw new Error(`the destination did not resume: ${e.message}\n${why()}`);
    });
    // only now may the guest end its loop: mark the control block (shared image, read with O_DIRECT)
    const fd = openSync(image, "r+");
    try {
      writeSync(fd, Buffer.from(`${STOP_MARK}\n`), 0, STOP_MARK.length + 1, CTRL_BLOCK * 4096);
    } finally {
      closeSync(fd);
    }
    // the guest goes on on the destination and finishes there
    const done = await dst.waitLine(/^RESULT done/, 300_000).catch((e: Error) => {
      throw new Error(`${e.message}\n${why()}`);
    });
    expect(done).toBeDefined();
    await dst.exited;

    // where each numbered block was reported written: before the migrate command, until it completed, after
    const wrote = (lines: readonly string[]) => lines.map((l) => /^RESULT wrote (\d+)$/.exec(l.trim())).filter((m) => m !== null).map((m) => Number(m[1]));
    const before = Math.max(0, ...wrote(src.lines().slice(0, srcAtStart)));
    const duringEnd = Math.max(before, ...wrote(src.lines()), ...wrote(dst.lines().slice(0, dstAtEnd)));
    const r = resultMap(parseResults([...src.lines(), ...dst.lines()].join("\n")));
    const blocks = Number(r.loop_done);
    console.log(
      `[virtio-blk migration] blocks written: ${before} before migrate, ${duringEnd - before} during (${((t1 - t0) / 1000).toFixed(1)} s), ` +
        `${blocks - duringEnd} after; told to stop at ${r.told_to_stop ?? "-"}; downtime ${result.info.downtime ?? "?"} ms; A served ${devA.stats.writes} writes, B ${devB.stats.writes}`,
    );
    expect(r.error, why()).toBeUndefined();
    // the guest saw the mark (so it ran on the destination, after the migration) and wrote AFTER more blocks
    expect(r.told_to_stop, `the guest never saw the control block marked: it wrote ${r.loop_done} blocks\n${why()}`).toBeDefined();
    expect(dst.lines().some((l) => l.trim() === `RESULT told_to_stop ${r.told_to_stop}`), why()).toBe(true);
    expect(blocks, why()).toBe(Number(r.told_to_stop) + AFTER);
    expect(blocks - duringEnd, why()).toBeGreaterThan(0); // the loop did go on after the switch-over

    // QEMU drove VFIO migration through both servers, and the source quiesced first
    const onA = a.log.records(mark.a);
    const onB = b.log.records(mark.b);
    const states = (recs: typeof onA) => recs.filter((x) => x.msg === "migration state").map((x) => `${String(x.from)}->${String(x.now)}`);
    console.log(`[virtio-blk migration] server A: ${states(onA).join(", ")}; server B: ${states(onB).join(", ")}`);
    expect(states(onA).some((s) => s.endsWith("STOP_COPY")), why()).toBe(true);
    expect(states(onB).some((s) => s.endsWith("RUNNING")), why()).toBe(true);
    expect(received(onB, "MIG_DATA_WRITE").length, why()).toBeGreaterThan(0);
    expect(devB.stats.writes, why()).toBeGreaterThan(0);

    // nothing lost, nothing done twice: one OUT request per block, across both servers
    expect(devA.stats.writes + devB.stats.writes, why()).toBe(blocks);
    expect(devA.stats.bytesWritten + devB.stats.bytesWritten, why()).toBe(blocks * 4096);
    await a.server.close();
    await b.server.close();
    const bytes = readFileSync(image).subarray(0, blocks * 4096);
    for (let n = 0; n < blocks; n++) {
      const head = bytes.subarray(n * 4096, n * 4096 + 12).toString("latin1");
      if (head !== `blk${String(n).padStart(8, "0")}\n`) throw new Error(`block ${n} holds ${JSON.stringify(head)}\n${why()}`);
    }
    const filler = createHash("sha256").update(bytes.subarray(12, 4096)).digest("hex");
    expect(filler, why()).toBe(r.filler_sha);
    expect(createHash("sha256").update(bytes).digest("hex"), why()).toBe(r.readback_sha);
    // B: QEMU stops the device when the guest powers off (RUNNING -> STOP) and then leaves: an ordinary end
    expect(a.problems(), why()).toEqual([]);
    expect(b.problems(), why()).toEqual([]);
  }, 1_200_000);
});
