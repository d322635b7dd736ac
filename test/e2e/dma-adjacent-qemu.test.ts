/**
 * Device DMA across QEMU's adjacent DMA_MAP regions (issue 9, part 2, item
 * 2). QEMU 11.1.3 maps a q35 guest's low memory as regions that touch:
 * RAM [0, 0xc0000) with an fd, the option ROM [0xc0000, 0xe0000) and the
 * BIOS [0xe0000, 0x100000) read-only without one, and RAM from 0x100000
 * with an fd again. edu's DMA engine reads 512 bytes across each edge (fd
 * into fd-less, fd-less into fd): every byte arrives as the guest sees it
 * (qtest reads guest memory). A DMA write that would reach the read-only
 * BIOS is refused, and writes nothing.
 */
import { afterAll, beforeAll, expect, it } from "vitest";
import { describeQemu } from "./harness/describe-qemu.ts";
import { makeSharedDir, type SharedDir } from "./harness/shared-dir.ts";
import { startServer, type ServerHandle } from "./harness/server.ts";
import { startQemu, type QemuInstance } from "./harness/qemu.ts";
import * as pci from "./harness/pci.ts";
import { EDU_DEVICE, EDU_VENDOR, EduGuest, bringUp, pattern } from "./harness/edu-guest.ts";
import { EDU_DMA_BUFFER, EduDevice } from "../../devices/edu/edu.ts";

const LEN = 512;

describeQemu("device DMA across QEMU's adjacent DMA_MAP regions (fd-backed and fd-less)", () => {
  let dir: SharedDir;
  let server: ServerHandle;
  let qemu: QemuInstance;
  let edu: EduGuest;

  beforeAll(async () => {
    dir = makeSharedDir("vfu-adj-");
    server = startServer({ dir, device: new EduDevice(), trace: false, level: "info" });
    qemu = await startQemu({ dir, memMiB: 256, vfioUserSocket: server.socketPath });
    const b = await pci.findDevice(qemu.qtest, EDU_VENDOR, EDU_DEVICE);
    edu = new EduGuest(qemu.qtest, b!, await bringUp(qemu.qtest, b!, new pci.BarAllocator()));
  }, 60_000);

  afterAll(async () => {
    await qemu?.stop();
    await server?.server.close();
    dir?.cleanup();
  });

  it("QEMU maps low memory as adjacent regions, with and without fds", () => {
    const maps = [...server.server.endpoint.dmaTable.regions()].map((r) => ({ iova: r.iova, end: r.iova + r.size, fd: r.memory !== null, writable: r.writable }));
    const at = (a: bigint) => maps.find((m) => a >= m.iova && a < m.end);
    expect(at(0xbff00n)?.fd).toBe(true);
    expect(at(0xc0000n)).toMatchObject({ fd: false, iova: at(0xbff00n)!.end });
    expect(at(0xfff00n)).toMatchObject({ fd: false, writable: false });
    expect(at(0x100000n)).toMatchObject({ fd: true, iova: at(0xfff00n)!.end });
  });

  for (const [name, start] of [
    ["RAM (fd) into the option ROM (no fd)", 0xbff00n],
    ["the BIOS (no fd) into RAM (fd)", 0xfff00n],
  ] as const) {
    it(`reads ${LEN} bytes across the edge from ${name}`, async () => {
      const qt = qemu.qtest;
      // RAM below the edge gets a pattern; ROM bytes are whatever the firmware holds
      if (start === 0xbff00n) await qt.write(start, pattern(256, 7));
      else await qt.write(0x100000n, pattern(256, 9));
      const want = await qt.read(start, LEN);
      await edu.dma(start, EDU_DMA_BUFFER, LEN, 0); // guest memory -> edu buffer
      await edu.dma(EDU_DMA_BUFFER, 0x200000n, LEN, 0x2); // edu buffer -> plain RAM
      const got = await qt.read(0x200000n, LEN);
      expect(got.equals(want)).toBe(true);
      expect(server.problems()).toEqual([]);
    });
  }

  it("a DMA write that would reach the read-only BIOS is refused and writes nothing", async () => {
    const qt = qemu.qtest;
    await qt.write(0x200000n, pattern(LEN, 3));
    await edu.dma(0x200000n, EDU_DMA_BUFFER, LEN, 0);
    const before = await qt.read(0xfff00n, LEN);
    const mark = server.log.length;
    await edu.dma(EDU_DMA_BUFFER, 0xfff00n, LEN, 0x2);
    expect((await qt.read(0xfff00n, LEN)).equals(before)).toBe(true);
    const refused = server.log.records(mark).filter((r) => r.msg === "edu: DMA failed");
    expect(refused.length).toBe(1);
    expect(String(refused[0]!.err)).toMatch(/not writable/);
  });
});
