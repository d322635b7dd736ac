import { describe, expect, it } from "vitest";
import { ConfigSpace } from "../../../src/pci/config-space.ts";
import { BASE_SPEC, make, r16, r32, r8, w16, w32, w8 } from "./helpers.ts";
import { PciCommand, PciHeader, PciStatus } from "../../../src/pci/registers.ts";

describe("header identity", () => {
  it("reads the identity fields little-endian", () => {
    const c = make();
    expect(r16(c, 0x00)).toBe(0x1234);
    expect(r16(c, 0x02)).toBe(0x11e8);
    expect(r8(c, 0x08)).toBe(0x10);
    expect(r32(c, 0x08)).toBe(0x00ff_0110);
    expect(r8(c, 0x0e)).toBe(0);
    expect(r8(c, 0x0f)).toBe(0);
    expect(r16(c, 0x2c)).toBe(0x1af4);
    expect(r16(c, 0x2e)).toBe(0x1100);
    expect(r8(c, 0x3d)).toBe(1);
    expect(c.size).toBe(256);
  });

  it("ignores writes to read-only identity bytes", () => {
    const c = make();
    const before = c.read(0, 256);
    for (const o of [0x00, 0x02, 0x08, 0x0e, 0x0f, 0x2c, 0x2e, 0x34, 0x3d, 0x3e]) w16(c, o, 0xa5a5);
    w32(c, 0x28, 0xffff_ffff); // CardBus CIS
    const after = c.read(0, 256);
    for (const o of [0, 1, 2, 3, 8, 9, 10, 11, 0x0e, 0x0f, 0x28, 0x2c, 0x2d, 0x2e, 0x2f, 0x34, 0x3d, 0x3e, 0x3f]) {
      expect(after[o], `offset 0x${o.toString(16)}`).toBe(before[o]);
    }
  });

  it("makes cache line size, latency timer and interrupt line writable", () => {
    const c = make();
    w8(c, 0x0c, 0x10);
    w8(c, 0x0d, 0x40);
    w8(c, 0x3c, 0x0b);
    expect(r8(c, 0x0c)).toBe(0x10);
    expect(r8(c, 0x0d)).toBe(0x40);
    expect(r8(c, 0x3c)).toBe(0x0b);
    expect(r8(c, 0x3d)).toBe(1);
  });

  it("has no expansion ROM: 0x30 reads 0 after sizing", () => {
    const c = make();
    w32(c, 0x30, 0xffff_fffe);
    expect(r32(c, 0x30)).toBe(0);
    w32(c, 0x30, 0xffff_ffff);
    expect(r32(c, 0x30)).toBe(0);
  });

  it("reads and writes at any byte offset and length, and refuses out of range", () => {
    const c = make();
    expect(c.read(1, 3)).toEqual(Buffer.from([0x12, 0xe8, 0x11]));
    expect(c.read(0, 0).length).toBe(0);
    expect(c.read(255, 1).length).toBe(1);
    expect(() => c.read(255, 2)).toThrow(RangeError);
    expect(() => c.read(-1, 1)).toThrow(RangeError);
    expect(() => c.write(256, Uint8Array.of(0))).toThrow(RangeError);
  });

  it("validates the spec", () => {
    expect(() => make({ vendorId: 0xffff })).toThrow();
    expect(() => make({ vendorId: 0x10000 })).toThrow();
    expect(() => make({ classCode: 1 << 24 })).toThrow();
    expect(() => make({ interruptPin: 5 })).toThrow();
    expect(() => make({ bars: [{ index: 0, size: 0x1001n, kind: "mem32" }] })).toThrow(/power of two/);
    expect(() => make({ bars: [{ index: 0, size: 8n, kind: "mem32" }] })).toThrow();
    expect(() => make({ bars: [{ index: 0, size: 2n, kind: "io" }] })).toThrow();
    expect(() => make({ bars: [{ index: 5, size: 0x1000n, kind: "mem64" }] })).toThrow();
    expect(() => make({ bars: [{ index: 6, size: 0x1000n, kind: "mem32" }] })).toThrow();
    expect(() =>
      make({
        bars: [
          { index: 0, size: 0x1000n, kind: "mem64" },
          { index: 1, size: 0x1000n, kind: "mem32" },
        ],
      }),
    ).toThrow(/twice/);
  });
});

describe("command and status", () => {
  it("keeps only the writable command bits", () => {
    const c = make();
    w16(c, 0x04, 0xffff);
    expect(c.command).toBe(
      PciCommand.IO | PciCommand.MEMORY | PciCommand.MASTER | PciCommand.PARITY | PciCommand.SERR | PciCommand.INTX_DISABLE,
    );
    expect(c.command).toBe(0x0547);
    expect(c.ioEnabled && c.memoryEnabled && c.busMaster && c.intxDisabled).toBe(true);
    w16(c, 0x04, 0);
    expect(c.command).toBe(0);
    expect(c.ioEnabled || c.memoryEnabled || c.busMaster || c.intxDisabled).toBe(false);
  });

  it("reports commandChanged only when the value changes", () => {
    const c = make();
    expect(w16(c, 0x04, PciCommand.MEMORY).commandChanged).toBe(true);
    expect(w16(c, 0x04, PciCommand.MEMORY).commandChanged).toBe(false);
    expect(w8(c, 0x05, 0x04).commandChanged).toBe(true);
    expect(c.intxDisabled).toBe(true);
  });

  it("sets the capability-list bit only when capabilities exist, read-only", () => {
    const none = make();
    expect(r16(none, 0x06) & PciStatus.CAP_LIST).toBe(0);
    expect(r8(none, 0x34)).toBe(0);
    const some = make({ capabilities: { pm: true } });
    expect(r16(some, 0x06) & PciStatus.CAP_LIST).toBe(PciStatus.CAP_LIST);
    w16(some, 0x06, 0xffff);
    w16(some, 0x06, 0);
    expect(r16(some, 0x06)).toBe(PciStatus.CAP_LIST);
  });

  it("shows interrupt status from the device, read-only to the guest", () => {
    const c = make();
    c.setInterruptStatus(true);
    expect(r16(c, 0x06) & PciStatus.INTERRUPT).toBe(PciStatus.INTERRUPT);
    w16(c, 0x06, 0);
    w16(c, 0x06, 0xffff);
    expect(r16(c, 0x06) & PciStatus.INTERRUPT).toBe(PciStatus.INTERRUPT);
    c.setInterruptStatus(false);
    expect(r16(c, 0x06) & PciStatus.INTERRUPT).toBe(0);
    w16(c, 0x06, 0xffff);
    expect(r16(c, 0x06) & PciStatus.INTERRUPT).toBe(0);
  });

  it("clears error bits on write-1 only", () => {
    const c = make({ capabilities: { msi: { vectors: 1 } } });
    c.signalStatus(PciStatus.REC_MASTER_ABORT | PciStatus.SIG_SYSTEM_ERROR | PciStatus.DETECTED_PARITY);
    expect(r16(c, 0x06)).toBe(0xe010);
    w16(c, 0x06, 0); // writing 0 clears nothing
    expect(r16(c, 0x06)).toBe(0xe010);
    w16(c, 0x06, PciStatus.REC_MASTER_ABORT);
    expect(r16(c, 0x06)).toBe(0xc010);
    w16(c, 0x06, 0xffff);
    expect(r16(c, 0x06)).toBe(PciStatus.CAP_LIST);
    expect(() => c.signalStatus(PciStatus.CAP_LIST)).toThrow(RangeError);
  });

  it("keeps status semantics in a 32-bit write at 0x04", () => {
    const c = make({ capabilities: { pm: true } });
    c.signalStatus(PciStatus.SIG_TARGET_ABORT | PciStatus.REC_MASTER_ABORT);
    c.setInterruptStatus(true);
    // Typical read-modify-write of the command register: status bytes echo back.
    const dword = r32(c, 0x04);
    expect(dword >>> 16).toBe(0x2818);
    const fx = w32(c, 0x04, (dword & 0xffff_0000) | PciCommand.MEMORY | PciCommand.MASTER);
    expect(fx.commandChanged).toBe(true);
    expect(c.command).toBe(0x0006);
    // The echoed error bits were cleared; interrupt status and cap list stay.
    expect(r16(c, 0x06)).toBe(PciStatus.CAP_LIST | PciStatus.INTERRUPT);

    c.signalStatus(PciStatus.REC_MASTER_ABORT);
    w32(c, 0x04, 0x0000_0006);
    expect(r16(c, 0x06)).toBe(PciStatus.CAP_LIST | PciStatus.INTERRUPT | PciStatus.REC_MASTER_ABORT);
  });
});

describe("BARs", () => {
  it("sizes a mem32 BAR", () => {
    const c = make({ bars: [{ index: 0, size: 0x1000n, kind: "mem32" }] });
    expect(r32(c, 0x10)).toBe(0);
    const fx = w32(c, 0x10, 0xffff_ffff);
    expect(r32(c, 0x10)).toBe(0xffff_f000);
    expect(fx.barsChanged).toEqual([0]);
    w32(c, 0x10, 0xfebf_1234);
    expect(r32(c, 0x10)).toBe(0xfebf_1000);
    expect(c.barAddress(0)).toBe(0xfebf_1000n);
  });

  it("sizes a prefetchable mem32 BAR with the type bits kept", () => {
    const c = make({ bars: [{ index: 2, size: 0x10n, kind: "mem32", prefetchable: true }] });
    expect(r32(c, 0x18)).toBe(0x8);
    w32(c, 0x18, 0xffff_ffff);
    expect(r32(c, 0x18)).toBe(0xffff_fff8);
    w32(c, 0x18, 0);
    expect(r32(c, 0x18)).toBe(0x8);
  });

  it("sizes both halves of a mem64 BAR", () => {
    const c = make({ bars: [{ index: 2, size: 0x4000n, kind: "mem64", prefetchable: true }] });
    expect(r32(c, 0x18)).toBe(0xc);
    expect(w32(c, 0x18, 0xffff_ffff).barsChanged).toEqual([2]);
    expect(w32(c, 0x1c, 0xffff_ffff).barsChanged).toEqual([2]);
    expect(r32(c, 0x18)).toBe(0xffff_c00c);
    expect(r32(c, 0x1c)).toBe(0xffff_ffff);
    w32(c, 0x18, 0xe000_0000);
    w32(c, 0x1c, 0x0000_0080);
    expect(c.barAddress(2)).toBe(0x80_e000_0000n);
    expect(() => c.barAddress(3)).toThrow(RangeError);
  });

  it("sizes a mem64 BAR larger than 4 GiB: low dword has no address bits", () => {
    const c = make({ bars: [{ index: 0, size: 1n << 33n, kind: "mem64" }] });
    w32(c, 0x10, 0xffff_ffff);
    w32(c, 0x14, 0xffff_ffff);
    expect(r32(c, 0x10)).toBe(0x4);
    expect(r32(c, 0x14)).toBe(0xffff_fffe);
  });

  it("sizes an io BAR", () => {
    const c = make({ bars: [{ index: 1, size: 0x20n, kind: "io" }] });
    expect(r32(c, 0x14)).toBe(0x1);
    w32(c, 0x14, 0xffff_ffff);
    expect(r32(c, 0x14)).toBe(0xffff_ffe1);
    w32(c, 0x14, 0xc042);
    expect(r32(c, 0x14)).toBe(0xc041);
    expect(c.barAddress(1)).toBe(0xc040n);
  });

  it("keeps unused BARs at 0 and read-only", () => {
    const c = make({ bars: [{ index: 1, size: 0x100n, kind: "mem32" }] });
    for (const i of [0, 2, 3, 4, 5]) {
      const fx = w32(c, 0x10 + 4 * i, 0xffff_ffff);
      expect(r32(c, 0x10 + 4 * i)).toBe(0);
      expect(fx.barsChanged).toEqual([]);
    }
    expect(() => c.barAddress(0)).toThrow(RangeError);
  });

  it("takes byte writes into BARs", () => {
    const c = make({ bars: [{ index: 0, size: 0x100n, kind: "mem32" }] });
    w8(c, 0x13, 0xfe);
    w8(c, 0x11, 0x12);
    w8(c, 0x10, 0xff);
    expect(r32(c, 0x10)).toBe(0xfe00_1200);
  });

  it("reports each changed BAR once in a multi-BAR write", () => {
    const c = make({
      bars: [
        { index: 0, size: 0x1000n, kind: "mem64" },
        { index: 2, size: 0x100n, kind: "io" },
        { index: 4, size: 0x100n, kind: "mem32" },
      ],
    });
    const fx = c.write(0x10, new Uint8Array(24).fill(0xff));
    expect(fx.barsChanged).toEqual([0, 2, 4]);
    expect(fx.commandChanged).toBe(false);
  });
});

describe("PCI Express extended space", () => {
  it("is 4 KiB with an empty extended capability list", () => {
    const c = make({ capabilities: { pcie: true } });
    expect(c.size).toBe(4096);
    expect(r32(c, 0x100)).toBe(0);
    w32(c, 0x100, 0xffff_ffff);
    w32(c, 0xffc, 0xffff_ffff);
    expect(r32(c, 0x100)).toBe(0);
    expect(r32(c, 0xffc)).toBe(0);
    expect(c.read(0, 4096).length).toBe(4096);
  });
});

describe("reset", () => {
  it("restores power-on bytes", () => {
    const c = make({
      bars: [{ index: 0, size: 0x1000n, kind: "mem64" }],
      capabilities: { pm: true, msi: { vectors: 4, perVectorMask: true }, msix: { vectors: 4, tableBar: 0, tableOffset: 0, pbaBar: 0, pbaOffset: 0x800 }, pcie: true },
    });
    const powerOn = c.read(0, c.size);
    w32(c, 0x04, 0xffff_ffff);
    w32(c, 0x10, 0xfe00_0000);
    w32(c, 0x14, 0x1);
    w8(c, 0x3c, 11);
    c.write(0x40, new Uint8Array(0xa0).fill(0xff));
    c.setInterruptStatus(true);
    c.signalStatus(PciStatus.REC_MASTER_ABORT);
    expect(c.read(0, c.size).equals(powerOn)).toBe(false);
    c.reset();
    expect(c.read(0, c.size).equals(powerOn)).toBe(true);
    expect(c.msi!.enabled).toBe(false);
    expect(c.msix!.enabled).toBe(false);
  });
});

describe("snapshot and restore", () => {
  const spec = {
    ...BASE_SPEC,
    bars: [{ index: 0, size: 0x1000n, kind: "mem32" as const }],
    capabilities: { msi: { vectors: 4 as const } },
  };

  it("round-trips the guest-programmed state", () => {
    const a = new ConfigSpace(spec);
    w16(a, 0x04, 0x0406);
    w32(a, 0x10, 0xfebf_0000);
    w8(a, 0x3c, 10);
    const msi = a.msi!.capOffset;
    w32(a, msi + 4, 0xfee0_0000);
    w16(a, msi + 12, 0x4021);
    w16(a, msi + 2, 0x0021);
    a.setInterruptStatus(true);
    const snap = a.snapshot();
    expect(snap.length).toBe(256);

    const b = new ConfigSpace(spec);
    b.restore(snap);
    expect(b.read(0, 256).equals(a.read(0, 256))).toBe(true);
    expect(b.command).toBe(0x0406);
    expect(b.barAddress(0)).toBe(0xfebf_0000n);
    expect(b.msi!.enabled).toBe(true);
    expect(b.msi!.enabledVectors).toBe(4);
    expect(b.msi!.data).toBe(0x4021);
  });

  it("returns a copy, not a live view", () => {
    const a = new ConfigSpace(spec);
    const snap = a.snapshot();
    w16(a, 0x04, 0x2);
    expect(snap[4]).toBe(0);
  });

  it("refuses a snapshot of another vendor/device", () => {
    const other = new ConfigSpace({ ...spec, vendorId: 0x8086, deviceId: 0x10d3 });
    const b = new ConfigSpace(spec);
    expect(() => b.restore(other.snapshot())).toThrow(/vendor 0x8086 device 0x10d3/);
    const otherDevice = new ConfigSpace({ ...spec, deviceId: 0x11e9 });
    expect(() => b.restore(otherDevice.snapshot())).toThrow(Error);
  });

  it("refuses a snapshot of another size or layout", () => {
    const b = new ConfigSpace(spec);
    expect(() => b.restore(new Uint8Array(4096))).toThrow(/bytes/);
    const otherBars = new ConfigSpace({ ...spec, bars: [{ index: 0, size: 0x1000n, kind: "mem32", prefetchable: true }] });
    expect(() => b.restore(otherBars.snapshot())).toThrow(/read-only/);
    const otherCaps = new ConfigSpace({ ...spec, capabilities: { pm: true, msi: { vectors: 4 } } });
    expect(() => b.restore(otherCaps.snapshot())).toThrow(/read-only/);
    // A failed restore leaves the current bytes alone.
    expect(b.read(0, 256).equals(Buffer.from(new ConfigSpace(spec).snapshot()))).toBe(true);
  });

  it("refuses read-only bits a guest could never have set", () => {
    const b = new ConfigSpace(spec);
    const snap = b.snapshot();
    snap[PciHeader.COMMAND + 1] = 0x80; // command bit 15 is read-only 0
    expect(() => b.restore(snap)).toThrow(/0x05/);
  });
});
