/**
 * A real Linux guest uses our virtio-blk device with its own drivers:
 * Debian's cloud kernel 6.12 (virtio_pci built in, virtio_blk.ko from the
 * guest kit) under QEMU 11.1.3 / TCG, our server attached through
 * vfio-user-pci. The guest's /init:
 *
 * - loads virtio_blk and waits for /dev/vda; reports its size, block size,
 *   read-only flag, serial (GET_ID) and cache type (FLUSH), and which
 *   interrupts the driver took (MSI-X vectors, or INTx with pci=nomsi);
 * - writes 16 MiB of /dev/urandom to the disk with O_DIRECT (conv=fsync:
 *   a FLUSH follows), drops the page cache, reads it back with O_DIRECT and
 *   through the page cache, and prints the SHA-256 of each.
 *
 * The test compares the checksums, then reads the backing file after the VM
 * exited: it holds the same bytes. Also: a read-only disk refuses writes.
 */
import { createHash } from "node:crypto";
import { openSync, closeSync, readSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { afterEach, beforeAll, expect, it } from "vitest";
import { describeQemu } from "./harness/describe-qemu.ts";
import { makeSharedDir, type SharedDir } from "./harness/shared-dir.ts";
import { received, startServer, type ServerHandle } from "./harness/server.ts";
import { GUEST_PRELUDE, bootLinuxGuest, ensureGuestKit, resultMap, type GuestKitStatus } from "./harness/linux-guest.ts";
import { VirtioBlkDevice } from "../../devices/virtio-blk/virtio-blk.ts";

const REQUIRE = process.env.VFIO_USER_REQUIRE_QEMU === "1";
const DISK_BYTES = 64 << 20;
const PATTERN_MIB = 16;

/** Loads virtio_blk and finds the disk (sets DISK); prints what the driver made of the device. */
const DISK_PRELUDE = String.raw`
pci_find 0x1af4 0x1042
result revision "$(cat "$DEV/revision")"
insmod /lib/modules/virtio_blk.ko || fail "insmod virtio_blk"
i=0
while [ ! -b /dev/vda ]; do i=$((i + 1)); [ $i -lt 200 ] || fail "no /dev/vda"; sleep 0.05; done
DISK=/dev/vda
result driver "$(basename "$(readlink "$DEV/driver")")"
result sectors "$(cat /sys/block/vda/size)"
result logical_block_size "$(cat /sys/block/vda/queue/logical_block_size)"
result ro "$(cat /sys/block/vda/ro)"
result serial "$(cat /sys/block/vda/serial)"
result cache_type "$(cat /sys/block/vda/cache_type)"
result msi_irqs "$(ls "$DEV/msi_irqs" 2>/dev/null | wc -l)"
irqs() { awk '/virtio/ { s = 0; for (i = 2; i <= NF; i++) { if ($i ~ /^[0-9]+$/) s += $i; else break }; t += s } END { print t + 0 }' /proc/interrupts; }
result irq_lines "$(grep -c virtio /proc/interrupts)"
result irq_kinds "$(grep virtio /proc/interrupts | awk '{ for (i = 2; i <= NF; i++) if ($i !~ /^[0-9]+$/) { print $i; break } }' | sort -u | tr '\n' ' ')"
`;

const READ_WRITE_INIT = `${GUEST_PRELUDE}${DISK_PRELUDE}
dd if=/dev/urandom of=/tmp/pattern bs=1M count=${PATTERN_MIB} 2>/dev/null || fail "urandom"
result pattern_sha "$(sha256sum /tmp/pattern | cut -d' ' -f1)"
before=$(irqs)
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/tmp/pattern of=$DISK bs=1M oflag=direct conv=fsync 2>/dev/null || fail "dd write"
t1=$(cut -d' ' -f1 /proc/uptime)
result write_seconds "$t0 $t1"
echo 3 > /proc/sys/vm/drop_caches
result direct_sha "$(dd if=$DISK bs=1M count=${PATTERN_MIB} iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
result cached_sha "$(dd if=$DISK bs=64k count=${PATTERN_MIB * 16} 2>/dev/null | sha256sum | cut -d' ' -f1)"
result irqs_during "$(( $(irqs) - before ))"
# the last sector, and one past the end (refused by the block layer, not the device)
result last_sector "$(dd if=$DISK bs=512 skip=$(( $(cat /sys/block/vda/size) - 1 )) count=1 iflag=direct 2>/dev/null | wc -c)"
result past_end "$(dd if=$DISK bs=512 skip=$(cat /sys/block/vda/size) count=1 iflag=direct 2>/dev/null | wc -c)"
finish
`;

const READ_ONLY_INIT = `${GUEST_PRELUDE}${DISK_PRELUDE}
result head_sha "$(dd if=$DISK bs=4k count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
if dd if=/dev/zero of=$DISK bs=4k count=1 oflag=direct 2>/dev/null; then result write "accepted"; else result write "refused"; fi
finish
`;

function sha256File(path: string, bytes: number): string {
  const fd = openSync(path, "r");
  try {
    const h = createHash("sha256");
    const buf = Buffer.alloc(1 << 20);
    for (let done = 0; done < bytes; ) {
      const n = readSync(fd, buf, 0, Math.min(buf.length, bytes - done), done);
      if (n <= 0) throw new Error(`short read of ${path} at ${done}`);
      h.update(buf.subarray(0, n));
      done += n;
    }
    return h.digest("hex");
  } finally {
    closeSync(fd);
  }
}

describeQemu("a Linux guest (TCG) uses our virtio-blk with its own virtio_pci and virtio_blk drivers", () => {
  let kit: GuestKitStatus = { ok: false, why: "not checked" };
  let dir: SharedDir | undefined;
  let server: ServerHandle | undefined;

  beforeAll(async () => {
    kit = await ensureGuestKit();
    if (!kit.ok) console.warn(`[virtio-blk-guest] no guest kit: ${kit.why}`);
  }, 600_000);

  afterEach(async () => {
    await server?.server.close();
    server = undefined;
    dir?.cleanup();
    dir = undefined;
  });

  async function boot(ctx: { skip: (note?: string) => void }, o: { init: string; append?: string; options?: Record<string, string>; label: string; prepare?: (image: string) => void }) {
    if (!kit.ok) {
      if (REQUIRE) throw new Error(`guest kit unavailable (VFIO_USER_REQUIRE_QEMU=1): ${kit.why}`);
      ctx.skip(kit.why);
      throw new Error("unreachable");
    }
    dir = makeSharedDir("vfu-vblk-");
    const image = join(dir.host, "disk.img");
    // a fresh, zero-filled image of the test's size
    writeFileSync(image, Buffer.alloc(DISK_BYTES));
    o.prepare?.(image);
    const device = new VirtioBlkDevice({ file: image, serial: "vfu-e2e-disk", ...o.options });
    // traced: the test counts what QEMU sent
    server = startServer({ dir, device, trace: true, level: "info" });
    const run = await bootLinuxGuest({
      dir,
      kit: kit.kit,
      init: o.init,
      vfioUserSocket: server.socketPath,
      timeoutMs: 120_000,
      append: o.append ?? "console=ttyS0 quiet panic=-1",
    });
    const lines = run.results.map((r) => `RESULT ${r.name} ${r.value}`).join("\n");
    console.log(`[virtio-blk-guest] ${o.label}: done ${((run.doneMs ?? run.totalMs) / 1000).toFixed(1)} s; stats ${JSON.stringify(device.stats)}\n${lines}`);
    const why = () => `guest console:\n${run.console.slice(-6000)}\nQEMU stderr:\n${run.stderr.slice(-3000)}\nserver log:\n${server?.log.tail(40) ?? ""}`;
    expect(run.timedOut, why()).toBe(false);
    expect(run.results.find((x) => x.name === "error"), why()).toBeUndefined();
    expect(run.results.at(-1)?.name, why()).toBe("done");
    const records = server.log.records();
    return { r: resultMap(run.results), why, image, device, problems: server.problems(), records };
  }

  for (const mode of ["msix", "intx"] as const) {
    it(`${mode === "msix" ? "MSI-X" : "INTx (pci=nomsi)"}: the disk appears with its size; 16 MiB written with O_DIRECT read back equal; the image holds them`, async (ctx) => {
      const append = mode === "intx" ? "console=ttyS0 quiet panic=-1 pci=nomsi" : undefined;
      const { r, why, image, device, problems, records } = await boot(ctx, { init: READ_WRITE_INIT, append, label: mode });
      expect(r.matches, why()).toBe("1");
      expect(Number(r.revision), why()).toBeGreaterThanOrEqual(1);
      expect(r.driver, why()).toBe("virtio-pci");
      expect(r.sectors, why()).toBe(String(DISK_BYTES / 512));
      expect(r.logical_block_size, why()).toBe("512");
      expect(r.ro, why()).toBe("0");
      expect(r.serial, why()).toBe("vfu-e2e-disk");
      expect(r.cache_type, why()).toBe("write back");
      if (mode === "msix") {
        // config vector + one per queue
        expect(r.msi_irqs, why()).toBe("2");
        expect(r.irq_kinds, why()).toMatch(/MSI/);
      } else {
        expect(r.msi_irqs, why()).toBe("0");
        expect(r.irq_kinds, why()).toMatch(/IO-APIC/);
      }
      expect(Number(r.irqs_during), why()).toBeGreaterThan(0);
      expect(r.pattern_sha, why()).toMatch(/^[0-9a-f]{64}$/);
      expect(r.direct_sha, why()).toBe(r.pattern_sha);
      expect(r.cached_sha, why()).toBe(r.pattern_sha);
      expect(r.last_sector, why()).toBe("512");
      expect(r.past_end, why()).toBe("0");
      // after the VM exited (and the device flushed on close): the same bytes in the file
      await server!.server.close();
      expect(sha256File(image, PATTERN_MIB << 20), why()).toBe(r.pattern_sha);
      expect(device.stats.zeroCopy, why()).toBeGreaterThan(0);
      expect(device.stats.flushes, why()).toBeGreaterThan(0);
      // QEMU 11.1.3 never asks for the doorbells' ioeventfds: every notification came as a REGION_WRITE
      expect(received(records, "DEVICE_GET_REGION_IO_FDS"), why()).toEqual([]);
      expect(server!.server.endpoint.ioEventFds.rings, why()).toBe(0);
      expect(problems.filter((p) => p.msg !== "recv"), why()).toEqual([]);
    }, 180_000);
  }

  it("readonly=on: the guest sees a read-only disk with the image's bytes, and a write is refused", async (ctx) => {
    let head = "";
    const { r, why } = await boot(ctx, {
      init: READ_ONLY_INIT,
      options: { readonly: "on" },
      label: "readonly",
      prepare: (image) => {
        const b = Buffer.alloc(64 << 10);
        for (let i = 0; i < b.length; i++) b[i] = (i * 7 + 3) & 0xff;
        const fd = openSync(image, "r+");
        try {
          writeSync(fd, b, 0, b.length, 0);
        } finally {
          closeSync(fd);
        }
        head = createHash("sha256").update(b).digest("hex");
      },
    });
    expect(r.ro, why()).toBe("1");
    expect(r.head_sha, why()).toBe(head);
    expect(r.write, why()).toBe("refused");
  }, 180_000);
});
