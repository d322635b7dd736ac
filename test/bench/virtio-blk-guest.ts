/**
 * virtio-blk in a real guest, ours beside QEMU's own: one Linux 6.12 guest
 * under QEMU 11.1.3 / TCG with two disks on the same raw image, our
 * virtio-blk (the `vfio-user-ts serve --device virtio-blk` CLI process,
 * attached through vfio-user-pci, guest RAM shared by memfd) and QEMU's
 * virtio-blk-pci (-drive format=raw, cache=writeback, aio=threads: the same
 * page cache path as ours). Each disk gets its own half of the image.
 *
 * The guest runs busybox dd with O_DIRECT (so the guest's page cache is out
 * of it) on each disk in turn, alternating, `BENCH_ROUNDS` times (default
 * 3): sequential write and read in 1 MiB blocks, and 4 KiB reads and
 * writes at queue depth 1 (dd issues one request at a time: that is
 * latency, IOPS = 1 / latency). The table gives the median of the rounds and
 * ours / QEMU's, plus our server's CPU per request (from /proc, sampled as
 * the guest announces each phase). One more row runs four 4 KiB readers at
 * once (queue depth up to 4): what pipelining does to the ratio.
 *
 * Run alone:  npx tsx test/bench/virtio-blk-guest.ts
 * (needs the QEMU root and the guest kit with virtio_blk.ko; as root it
 * builds the kit; VFIO_USER_GUEST_KIT picks another kit; BENCH_MIB sets
 * the sequential size, default 64.)
 *
 * A benchmark reports; it fails only when it cannot run.
 */
import { readFileSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { makeSharedDir, toGuestPath } from "../e2e/harness/shared-dir.ts";
import { spawnCliServer } from "../e2e/harness/server.ts";
import { GUEST_PRELUDE, bootLinuxGuest, ensureGuestKit } from "../e2e/harness/linux-guest.ts";

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
/** Rounds run first and not counted (the host's page cache, the guest's first touches). */
const WARMUP = Number(process.env.BENCH_WARMUP ?? 1);
const SEQ_MIB = Number(process.env.BENCH_MIB ?? 64);
const SMALL_OPS = Number(process.env.BENCH_SMALL_OPS ?? 2048);
const IMAGE_MIB = 2 * SEQ_MIB + 16;

interface Phase {
  name: string;
  unit: "MB/s" | "IOPS";
  /** dd arguments (if, of, sizes). */
  dd: (disk: string, region: number) => string;
  /** dd processes run at once, each on its own part (default 1: queue depth 1). */
  parallel?: number;
  /** Requests one run makes (for CPU per request). */
  ops: number;
  bytes: number;
}

const PHASES: Phase[] = [
  { name: "seq-write-1M", unit: "MB/s", dd: (d, r) => `if=/dev/zero of=${d} bs=1M count=${SEQ_MIB} seek=${r * SEQ_MIB} oflag=direct`, ops: SEQ_MIB, bytes: SEQ_MIB << 20 },
  { name: "seq-read-1M", unit: "MB/s", dd: (d, r) => `if=${d} of=/dev/null bs=1M count=${SEQ_MIB} skip=${r * SEQ_MIB} iflag=direct`, ops: SEQ_MIB, bytes: SEQ_MIB << 20 },
  { name: "read-4k-qd1", unit: "IOPS", dd: (d, r) => `if=${d} of=/dev/null bs=4k count=${SMALL_OPS} skip=${r * SEQ_MIB * 256} iflag=direct`, ops: SMALL_OPS, bytes: SMALL_OPS * 4096 },
  {
    name: "read-4k-4jobs",
    unit: "IOPS",
    parallel: 4,
    // job j reads its own quarter of the region (the shell expands $j)
    dd: (d, r) => `if=${d} of=/dev/null bs=4k count=${SMALL_OPS / 4} skip=$(( ${r * SEQ_MIB * 256} + j * ${SMALL_OPS / 4} )) iflag=direct`,
    ops: SMALL_OPS,
    bytes: SMALL_OPS * 4096,
  },
  { name: "write-4k-qd1", unit: "IOPS", dd: (d, r) => `if=/dev/zero of=${d} bs=4k count=${SMALL_OPS} seek=${r * SEQ_MIB * 256} oflag=direct`, ops: SMALL_OPS, bytes: SMALL_OPS * 4096 },
];

const DISKS = [
  { name: "ours", serial: "vfu-bench", region: 0 },
  { name: "qemu", serial: "qemu-bench", region: 1 },
];

function guestScript(): string {
  const lines: string[] = [GUEST_PRELUDE];
  lines.push(
    'insmod /lib/modules/virtio_blk.ko || fail "insmod virtio_blk"',
    'disk_of() { for b in /sys/block/vd*; do [ "$(cat $b/serial 2>/dev/null)" = "$1" ] && { echo "/dev/$(basename $b)"; return; }; done; }',
    "i=0",
    'while [ -z "$(disk_of vfu-bench)" ] || [ -z "$(disk_of qemu-bench)" ]; do i=$((i + 1)); [ $i -lt 400 ] || fail "disks not found"; sleep 0.05; done',
  );
  for (const d of DISKS) lines.push(`${d.name.toUpperCase()}=$(disk_of ${d.serial}); result disk_${d.name} "$${d.name.toUpperCase()}"`);
  // busybox dd says nothing of time: the host times each run between the guest's "begin" and "end" lines
  for (let round = 0; round < WARMUP + ROUNDS; round++) {
    for (const p of PHASES) {
      // alternate which disk goes first, so neither always runs on a warmer host
      const order = round % 2 === 0 ? DISKS : [...DISKS].reverse();
      for (const d of order) {
        lines.push(`result begin ${p.name} ${d.name} ${round}`);
        const dd = `dd ${p.dd(`$${d.name.toUpperCase()}`, d.region)} 2>/dev/null`;
        if ((p.parallel ?? 1) === 1) lines.push(`${dd} || fail "dd ${p.name} ${d.name}"`);
        else lines.push(`for j in $(seq 0 ${(p.parallel ?? 1) - 1}); do ${dd} & done; wait`);
        lines.push(`result end ${p.name} ${d.name} ${round}`);
      }
    }
  }
  lines.push("finish");
  return lines.join("\n");
}

/** utime + stime of a process, in µs. */
function cpuMicros(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const ticks = Number(fields[11]) + Number(fields[12]);
  return (ticks * 1e6) / 100; // USER_HZ
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(): Promise<void> {
  const kit = await ensureGuestKit();
  if (!kit.ok) throw new Error(`no guest kit: ${kit.why}`);
  const dir = makeSharedDir("vfu-vblk-bench-");
  let stopServer: (() => Promise<unknown>) | null = null;
  try {
    const image = join(dir.host, "disk.img");
    // sparse: both disks see the whole image, each writes its half
    writeFileSync(image, Buffer.alloc(0));
    truncateSync(image, IMAGE_MIB << 20);
    const server = await spawnCliServer({
      dir,
      device: "virtio-blk",
      name: "vblk.sock",
      args: ["--opt", `file=${image}`, "--opt", "serial=vfu-bench", "--log-level", "warn"],
    });
    stopServer = () => server.stop();
    const pid = server.proc.pid!;
    const results: { phase: string; disk: string; round: number; bytes: number; seconds: number; cpuUs?: number }[] = [];
    let lastBegin: { key: string; cpu: number; at: number } | null = null;
    const run = await bootLinuxGuest({
      dir,
      kit: kit.kit,
      init: guestScript(),
      vfioUserSocket: server.socketPath,
      timeoutMs: 1_800_000,
      extraArgs: [
        "-drive", `file=${toGuestPath(image)},format=raw,if=none,id=qd,cache=writeback,aio=threads`,
        "-device", "virtio-blk-pci,drive=qd,serial=qemu-bench",
      ],
      onLine: (line) => {
        const m = /^RESULT (begin|end) (\S+) (\S+) (\d+)$/.exec(line.trim());
        if (!m) return;
        const key = `${m[2]} ${m[3]} ${m[4]}`;
        if (m[1] === "begin") {
          lastBegin = { key, cpu: cpuMicros(pid), at: performance.now() };
          return;
        }
        if (lastBegin?.key !== key) return;
        const phase = PHASES.find((p) => p.name === m[2])!;
        results.push({
          phase: m[2]!,
          disk: m[3]!,
          round: Number(m[4]),
          bytes: phase.bytes,
          seconds: (performance.now() - lastBegin.at) / 1000,
          cpuUs: m[3] === "ours" ? cpuMicros(pid) - lastBegin.cpu : undefined,
        });
      },
    });
    if (run.timedOut || run.results.find((r) => r.name === "error") || run.results.at(-1)?.name !== "done") {
      throw new Error(`guest run failed: ${run.results.find((r) => r.name === "error")?.value ?? "no done"}\n${run.console.slice(-4000)}\n${run.stderr.slice(-2000)}`);
    }
    const counted = results.filter((r) => r.round >= WARMUP && r.seconds > 0);
    const rows: string[][] = [["row", "ours", "QEMU virtio-blk-pci", "ours / QEMU (median of per-round ratios)", "our server CPU per request"]];
    for (const p of PHASES) {
      const value = (r: (typeof results)[number]) => (p.unit === "MB/s" ? r.bytes / r.seconds / 1e6 : r.bytes / 4096 / r.seconds);
      const of = (disk: string) => counted.filter((r) => r.phase === p.name && r.disk === disk);
      const ours = median(of("ours").map(value));
      const qemu = median(of("qemu").map(value));
      // each round runs both disks back to back: their ratio is less exposed to the host's load than the medians are
      const ratios = of("ours").map((o) => {
        const q = of("qemu").find((x) => x.round === o.round);
        return q ? value(o) / value(q) : NaN;
      });
      const cpu = median(of("ours").filter((r) => r.cpuUs !== undefined).map((r) => r.cpuUs! / p.ops));
      const fmt = (v: number) => `${v.toFixed(p.unit === "MB/s" ? 1 : 0)} ${p.unit}`;
      rows.push([p.name, fmt(ours), fmt(qemu), `${median(ratios).toFixed(2)}x (${ratios.map((x) => x.toFixed(2)).join(", ")})`, `${cpu.toFixed(0)} µs`]);
    }
    const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
    console.log(`virtio-blk in a Linux guest (TCG, QEMU 11.1.3), median of ${ROUNDS} rounds after ${WARMUP} warm-up, O_DIRECT, ${SEQ_MIB} MiB sequential, ${SMALL_OPS} x 4 KiB at QD1`);
    for (const r of rows) console.log(`| ${r.map((c, i) => c.padEnd(widths[i]!)).join(" | ")} |`);
    console.log(`guest done in ${((run.doneMs ?? run.totalMs) / 1000).toFixed(1)} s; per-run figures: ${JSON.stringify(results.map((r) => [r.phase, r.disk, r.round, +(r.bytes / r.seconds / 1e6).toFixed(2)]))}`);
  } finally {
    await stopServer?.();
    dir.cleanup();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`virtio-blk-guest bench: ${(err as Error).stack ?? err}`);
    process.exit(1);
  },
);
