import { describe, expect, it } from "vitest";
import { ConfigSpace } from "../../../src/pci/config-space.ts";
import { make, r16, r32, r8, w16, w32, w8 } from "./helpers.ts";
import { placeCapabilities, walkCapabilities } from "../../../src/pci/capabilities.ts";
import { PciCapId, PciExp, PciMsi, PciMsix, PciPm } from "../../../src/pci/registers.ts";

const MSIX = { vectors: 8, tableBar: 2, tableOffset: 0x0, pbaBar: 2, pbaOffset: 0x800 };
const MSIX_BARS = [
  { index: 0, size: 0x1000n, kind: "mem32" as const },
  { index: 2, size: 0x1000n, kind: "mem64" as const },
];

function walk(c: ConfigSpace) {
  return walkCapabilities((o) => r8(c, o));
}

describe("capability list", () => {
  it("visits exactly the requested capabilities in order and ends with 0", () => {
    const c = make({
      bars: MSIX_BARS,
      capabilities: { pm: true, msi: { vectors: 4 }, msix: MSIX, pcie: true },
    });
    expect(r8(c, 0x34)).toBe(0x40);
    const list = walk(c);
    expect(list).toEqual([
      { id: PciCapId.PM, offset: 0x40 },
      { id: PciCapId.MSI, offset: 0x48 },
      { id: PciCapId.MSIX, offset: 0x58 },
      { id: PciCapId.EXP, offset: 0x64 },
    ]);
    expect(r8(c, 0x64 + 1)).toBe(0);
    expect(c.pm!.capOffset).toBe(0x40);
    expect(c.msi!.capOffset).toBe(0x48);
    expect(c.msix!.capOffset).toBe(0x58);
    expect(c.pcie!.capOffset).toBe(0x64);
  });

  it("places a masked MSI capability at 24 bytes", () => {
    const c = make({ bars: MSIX_BARS, capabilities: { pm: true, msi: { vectors: 4, perVectorMask: true }, msix: MSIX, pcie: true } });
    expect(walk(c).map((e) => e.offset)).toEqual([0x40, 0x48, 0x60, 0x6c]);
  });

  for (const [name, caps, ids] of [
    ["pm only", { pm: true }, [PciCapId.PM]],
    ["msi only", { msi: { vectors: 1 as const } }, [PciCapId.MSI]],
    ["msix + pcie", { msix: MSIX, pcie: true }, [PciCapId.MSIX, PciCapId.EXP]],
    ["pm + msi", { pm: true, msi: { vectors: 2 as const } }, [PciCapId.PM, PciCapId.MSI]],
    ["none", {}, []],
  ] as const) {
    it(`lists ${name}`, () => {
      const c = make({ bars: MSIX_BARS, capabilities: caps });
      const list = walk(c);
      expect(list.map((e) => e.id)).toEqual(ids);
      for (const e of list) {
        expect(e.offset % 4).toBe(0);
        expect(e.offset).toBeGreaterThanOrEqual(0x40);
      }
      expect(c.msi === null).toBe(!("msi" in caps));
      expect(c.msix === null).toBe(!("msix" in caps));
    });
  }

  it("keeps IDs and next pointers read-only", () => {
    const c = make({ capabilities: { pm: true, msi: { vectors: 1 } } });
    w16(c, 0x40, 0xffff);
    w16(c, 0x48, 0xffff);
    expect(walk(c)).toEqual([
      { id: PciCapId.PM, offset: 0x40 },
      { id: PciCapId.MSI, offset: 0x48 },
    ]);
  });

  it("packs dword aligned and refuses overflow", () => {
    expect(placeCapabilities([8, 14, 12])).toEqual([0x40, 0x48, 0x58]);
    expect(() => placeCapabilities([0x80, 0x80])).toThrow(RangeError);
  });

  it("walker detects a loop", () => {
    const bytes = new Uint8Array(256);
    bytes[0x06] = 0x10;
    bytes[0x34] = 0x40;
    bytes[0x41] = 0x44;
    bytes[0x45] = 0x40;
    expect(() => walkCapabilities((o) => bytes[o]!)).toThrow(/loop/);
  });
});

describe("power management", () => {
  it("is version 3 with D0/D3hot writable and D1/D2 refused", () => {
    const c = make({ capabilities: { pm: true } });
    const pm = c.pm!.capOffset;
    expect(r16(c, pm + PciPm.PMC) & PciPm.CAP_VER_MASK).toBe(3);
    expect(r16(c, pm + PciPm.PMC) & (PciPm.CAP_D1 | PciPm.CAP_D2)).toBe(0);
    expect(c.pm!.powerState).toBe(0);
    w16(c, pm + PciPm.CTRL, 3);
    expect(c.pm!.powerState).toBe(3);
    w16(c, pm + PciPm.CTRL, 1);
    expect(c.pm!.powerState).toBe(3);
    w16(c, pm + PciPm.CTRL, 0);
    expect(c.pm!.powerState).toBe(0);
    w16(c, pm + PciPm.CTRL, 2);
    expect(c.pm!.powerState).toBe(0);
    // No PME: PME_En and PME_Status stay 0.
    w16(c, pm + PciPm.CTRL, 0xffff);
    expect(r16(c, pm + PciPm.CTRL)).toBe(PciPm.CTRL_NO_SOFT_RESET | 3);
  });
});

describe("MSI", () => {
  it("advertises 64-bit and multiple message capable", () => {
    const c = make({ capabilities: { msi: { vectors: 8 } } });
    const msi = c.msi!.capOffset;
    const flags = r16(c, msi + PciMsi.FLAGS);
    expect(flags & PciMsi.FLAGS_64BIT).toBe(PciMsi.FLAGS_64BIT);
    expect((flags & PciMsi.FLAGS_QMASK) >> 1).toBe(3);
    expect(flags & PciMsi.FLAGS_MASKBIT).toBe(0);
    expect(flags & PciMsi.FLAGS_ENABLE).toBe(0);
    expect(c.msi!.vectors).toBe(8);
  });

  it("decodes enable, address and data, and reports msiChanged", () => {
    const c = make({ capabilities: { pm: true, msi: { vectors: 1 } } });
    const msi = c.msi!.capOffset;
    expect(c.msi!.enabled).toBe(false);
    expect(w32(c, msi + PciMsi.ADDRESS_LO, 0xfee0_100f).msiChanged).toBe(true);
    w32(c, msi + PciMsi.ADDRESS_HI, 0x1);
    w16(c, msi + PciMsi.DATA_64, 0x4041);
    expect(c.msi!.address).toBe(0x1_fee0_100cn); // bits 1:0 are reserved
    expect(c.msi!.data).toBe(0x4041);
    const fx = w16(c, msi + PciMsi.FLAGS, PciMsi.FLAGS_ENABLE);
    expect(fx).toEqual({ commandChanged: false, barsChanged: [], msiChanged: true, msixChanged: false });
    expect(c.msi!.enabled).toBe(true);
    expect(c.msi!.enabledVectors).toBe(1);
    expect(w16(c, msi + PciMsi.FLAGS, PciMsi.FLAGS_ENABLE).msiChanged).toBe(false);
    // Extended message data is not capable: bytes 14-15 read-only 0.
    w16(c, msi + 14, 0xffff);
    expect(r16(c, msi + 14)).toBe(0);
    // 64-bit flag, MMC are read-only.
    w16(c, msi + PciMsi.FLAGS, 0);
    expect(r16(c, msi + PciMsi.FLAGS)).toBe(PciMsi.FLAGS_64BIT);
  });

  it("clamps multiple message enable to what is capable", () => {
    const c = make({ capabilities: { msi: { vectors: 4 } } });
    const msi = c.msi!.capOffset;
    w16(c, msi + PciMsi.FLAGS, (1 << 4) | 1);
    expect(c.msi!.enabledVectors).toBe(2);
    w16(c, msi + PciMsi.FLAGS, (7 << 4) | 1);
    expect(c.msi!.enabledVectors).toBe(4);
    expect((r16(c, msi + PciMsi.FLAGS) & PciMsi.FLAGS_QSIZE) >> 4).toBe(2);
    expect(c.msi!.enabled).toBe(true);

    const one = make({ capabilities: { msi: { vectors: 1 } } });
    w8(one, one.msi!.capOffset + PciMsi.FLAGS, 0x71);
    expect(one.msi!.enabledVectors).toBe(1);
    expect(one.msi!.enabled).toBe(true);

    const all = make({ capabilities: { msi: { vectors: 32 } } });
    w8(all, all.msi!.capOffset + PciMsi.FLAGS, 0x70);
    expect(all.msi!.enabledVectors).toBe(32);
  });

  it("has per-vector mask bits for implemented vectors and read-only pending bits", () => {
    const c = make({ capabilities: { msi: { vectors: 4, perVectorMask: true } } });
    const msi = c.msi!.capOffset;
    expect(r16(c, msi + PciMsi.FLAGS) & PciMsi.FLAGS_MASKBIT).toBe(PciMsi.FLAGS_MASKBIT);
    expect(c.msi!.perVectorMask).toBe(true);
    w32(c, msi + PciMsi.MASK_64, 0xffff_ffff);
    expect(r32(c, msi + PciMsi.MASK_64)).toBe(0xf);
    expect(c.msi!.masked(0)).toBe(true);
    w32(c, msi + PciMsi.MASK_64, 0b0100);
    expect([0, 1, 2, 3].map((v) => c.msi!.masked(v))).toEqual([false, false, true, false]);
    expect(() => c.msi!.masked(4)).toThrow(RangeError);

    c.setMsiPending(2, true);
    expect(c.msi!.pending(2)).toBe(true);
    w32(c, msi + PciMsi.PENDING_64, 0);
    expect(r32(c, msi + PciMsi.PENDING_64)).toBe(0b0100);
    c.setMsiPending(2, false);
    expect(r32(c, msi + PciMsi.PENDING_64)).toBe(0);

    const plain = make({ capabilities: { msi: { vectors: 2 } } });
    expect(plain.msi!.masked(1)).toBe(false);
    expect(() => plain.setMsiPending(0, true)).toThrow();
  });

  it("all 32 mask bits exist with 32 vectors", () => {
    const c = make({ capabilities: { msi: { vectors: 32, perVectorMask: true } } });
    w32(c, c.msi!.capOffset + PciMsi.MASK_64, 0xffff_ffff);
    expect(c.msi!.masked(31)).toBe(true);
  });
});

describe("MSI-X capability", () => {
  it("shows table size and locations read-only", () => {
    const c = make({ bars: MSIX_BARS, capabilities: { msix: { ...MSIX, tableOffset: 0x100, pbaOffset: 0x808 } } });
    const at = c.msix!.capOffset;
    expect(r16(c, at + PciMsix.FLAGS)).toBe(7);
    expect(r32(c, at + PciMsix.TABLE)).toBe(0x102);
    expect(r32(c, at + PciMsix.PBA)).toBe(0x80a);
    w32(c, at + PciMsix.TABLE, 0xffff_ffff);
    w32(c, at + PciMsix.PBA, 0);
    w16(c, at + PciMsix.FLAGS, 0x3fff);
    expect(r32(c, at + PciMsix.TABLE)).toBe(0x102);
    expect(r32(c, at + PciMsix.PBA)).toBe(0x80a);
    expect(r16(c, at + PciMsix.FLAGS)).toBe(7);
    expect(c.msix).toMatchObject({ vectors: 8, tableBar: 2, tableOffset: 0x100, pbaBar: 2, pbaOffset: 0x808 });
  });

  it("decodes enable and function mask and reports msixChanged", () => {
    const c = make({ bars: MSIX_BARS, capabilities: { msi: { vectors: 1 }, msix: MSIX } });
    const at = c.msix!.capOffset;
    expect(c.msix!.enabled).toBe(false);
    expect(c.msix!.functionMask).toBe(false);
    let fx = w16(c, at + PciMsix.FLAGS, PciMsix.FLAGS_ENABLE | PciMsix.FLAGS_MASKALL);
    expect(fx).toEqual({ commandChanged: false, barsChanged: [], msiChanged: false, msixChanged: true });
    expect(c.msix!.enabled).toBe(true);
    expect(c.msix!.functionMask).toBe(true);
    // Byte write of the high byte alone.
    fx = w8(c, at + PciMsix.FLAGS + 1, 0x80);
    expect(fx.msixChanged).toBe(true);
    expect(c.msix!.functionMask).toBe(false);
    expect(c.msix!.enabled).toBe(true);
    expect(w8(c, at + PciMsix.FLAGS + 1, 0x80).msixChanged).toBe(false);
  });

  it("refuses a table or PBA outside a memory BAR or overlapping", () => {
    expect(() => make({ bars: MSIX_BARS, capabilities: { msix: { ...MSIX, tableBar: 1 } } })).toThrow(/not a memory BAR/);
    expect(() => make({ bars: MSIX_BARS, capabilities: { msix: { ...MSIX, tableBar: 3 } } })).toThrow(/not a memory BAR/);
    expect(() => make({ bars: MSIX_BARS, capabilities: { msix: { ...MSIX, pbaOffset: 0x1000 } } })).toThrow(/fit/);
    expect(() => make({ bars: MSIX_BARS, capabilities: { msix: { ...MSIX, pbaOffset: 0x40 } } })).toThrow(/overlap/);
    expect(() => make({ bars: MSIX_BARS, capabilities: { msix: { ...MSIX, tableOffset: 4 } } })).toThrow(/multiple of 8/);
    expect(() => make({ bars: MSIX_BARS, capabilities: { msix: { ...MSIX, vectors: 2049 } } })).toThrow(RangeError);
    const io = [{ index: 0, size: 0x100n, kind: "io" as const }];
    expect(() => make({ bars: io, capabilities: { msix: { ...MSIX, tableBar: 0, pbaBar: 0, pbaOffset: 0x80 } } })).toThrow(/not a memory BAR/);
  });
});

describe("PCI Express capability", () => {
  it("is a version-2 endpoint, x1 at 2.5 GT/s", () => {
    const c = make({ capabilities: { pcie: true } });
    const at = c.pcie!.capOffset;
    expect(at).toBe(0x40);
    const flags = r16(c, at + PciExp.FLAGS);
    expect(flags & PciExp.FLAGS_VERS).toBe(2);
    expect((flags & PciExp.FLAGS_TYPE) >> 4).toBe(PciExp.TYPE_ENDPOINT);
    expect(r32(c, at + PciExp.DEVCAP) & PciExp.DEVCAP_RBER).toBe(PciExp.DEVCAP_RBER);
    const lnksta = r16(c, at + PciExp.LNKSTA);
    expect(lnksta & PciExp.LNKSTA_CLS).toBe(PciExp.LNKSTA_CLS_2_5GB);
    expect((lnksta & PciExp.LNKSTA_NLW) >> 4).toBe(1);
    const lnkcap = r32(c, at + PciExp.LNKCAP);
    expect(lnkcap & PciExp.LNKCAP_SLS).toBe(1);
    expect((lnkcap & PciExp.LNKCAP_MLW) >> 4).toBe(1);
    expect(r32(c, at + PciExp.LNKCAP2)).toBe(PciExp.LNKCAP2_SLS_2_5GB);
  });

  it("has reasonable device control, W1C device status and read-only link status", () => {
    const c = make({ capabilities: { pcie: true } });
    const at = c.pcie!.capOffset;
    expect(r16(c, at + PciExp.DEVCTL)).toBe(0x2810);
    w16(c, at + PciExp.DEVCTL, 0xffff);
    // Error enables, relaxed ordering, no snoop and MRRS; MPS stays 128 B, no FLR.
    expect(r16(c, at + PciExp.DEVCTL)).toBe(0x781f);
    w16(c, at + PciExp.DEVCTL, 0);
    expect(r16(c, at + PciExp.DEVCTL)).toBe(0);

    const snap = c.snapshot();
    snap[at + PciExp.DEVSTA] = PciExp.DEVSTA_CED | PciExp.DEVSTA_URD;
    c.restore(snap);
    w16(c, at + PciExp.DEVSTA, PciExp.DEVSTA_CED);
    expect(r16(c, at + PciExp.DEVSTA)).toBe(PciExp.DEVSTA_URD);

    w16(c, at + PciExp.LNKSTA, 0);
    expect(r16(c, at + PciExp.LNKSTA)).toBe(0x11);
    w16(c, at + PciExp.LNKCTL, 0xffff);
    expect(r16(c, at + PciExp.LNKCTL)).toBe(PciExp.LNKCTL_RCB | PciExp.LNKCTL_CCC | PciExp.LNKCTL_ES);
  });
});

describe("vendor-specific capabilities", () => {
  /** A 16-byte capability: ID, next, length, type, then three dwords. */
  const vendorBytes = (type: number) => Uint8Array.from([PciCapId.VNDR, 0xee, 16, type, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);

  it("are placed after the standard ones, dword aligned, with the framework's next pointers", () => {
    const c = make({
      bars: MSIX_BARS,
      capabilities: { msix: MSIX, vendor: [{ bytes: vendorBytes(1) }, { bytes: Uint8Array.from([PciCapId.VNDR, 0, 5, 7, 9]) }, { bytes: vendorBytes(3) }] },
    });
    const list = walk(c);
    expect(list).toEqual([
      { id: PciCapId.MSIX, offset: 0x40 },
      { id: PciCapId.VNDR, offset: 0x4c },
      { id: PciCapId.VNDR, offset: 0x5c },
      { id: PciCapId.VNDR, offset: 0x64 },
    ]);
    // the device's bytes, except byte 1 (0xee in the definition)
    expect([...c.read(0x4c, 16)]).toEqual([PciCapId.VNDR, 0x5c, ...vendorBytes(1).subarray(2)]);
    // a 5-byte body is padded to 8 with zeros
    expect([...c.read(0x5c, 8)]).toEqual([PciCapId.VNDR, 0x64, 5, 7, 9, 0, 0, 0]);
    expect(r8(c, 0x65)).toBe(0);
  });

  it("are read-only unless the device gives writable bits; ID and next pointer never are", () => {
    const writable = new Uint8Array(16);
    writable.fill(0xff, 4, 8);
    writable[0] = 0xff;
    writable[1] = 0xff;
    const c = make({ capabilities: { vendor: [{ bytes: vendorBytes(1) }, { bytes: vendorBytes(2), writable }] } });
    const [a, b] = walk(c);
    w32(c, a!.offset + 4, 0xffffffff);
    expect(r32(c, a!.offset + 4)).toBe(0x04030201);
    w32(c, b!.offset + 4, 0xdeadbeef);
    w32(c, b!.offset + 8, 0xdeadbeef);
    w16(c, b!.offset, 0xffff);
    expect(r32(c, b!.offset + 4)).toBe(0xdeadbeef);
    expect(r32(c, b!.offset + 8)).toBe(0x08070605);
    expect(r8(c, b!.offset)).toBe(PciCapId.VNDR);
    expect(r8(c, b!.offset + 1)).toBe(0);
    // written bits migrate: a snapshot with them restores, one changing read-only bits does not
    const snap = c.snapshot();
    const other = make({ capabilities: { vendor: [{ bytes: vendorBytes(1) }, { bytes: vendorBytes(2), writable }] } });
    other.restore(snap);
    expect(r32(other, b!.offset + 4)).toBe(0xdeadbeef);
    snap[b!.offset + 8] ^= 1;
    expect(() => other.restore(snap)).toThrow(/read-only bits/);
    // reset: back to the definition
    c.reset();
    expect(r32(c, b!.offset + 4)).toBe(0x04030201);
  });

  it("call the device's read hook for live contents and its write hook after a write", () => {
    const writes: [number, number, number][] = [];
    const writable = new Uint8Array(16).fill(0xff, 12, 16);
    let live = 0x11223344;
    const c = make({
      capabilities: {
        pm: true,
        vendor: [
          {
            bytes: vendorBytes(5),
            writable,
            read(offset, data) {
              // bytes 8..11 of the capability read a live value
              for (let i = 0; i < data.length; i++) {
                const o = offset + i;
                if (o >= 8 && o < 12) data[i] = (live >>> (8 * (o - 8))) & 0xff;
              }
            },
            write(offset, length, cap) {
              writes.push([offset, length, cap.readUInt32LE(12)]);
            },
          },
        ],
      },
    });
    const at = walk(c)[1]!.offset;
    expect(r32(c, at + 8)).toBe(0x11223344);
    live = 0x55667788;
    expect(r16(c, at + 10)).toBe(0x5566);
    // a whole-config read sees it too, and the bytes around it are the stored ones
    const all = c.read(0, 256);
    expect(all.readUInt32LE(at + 8)).toBe(0x55667788);
    expect(all.readUInt32LE(at + 4)).toBe(0x04030201);
    w32(c, at + 12, 0xcafef00d);
    w16(c, at + 2, 0); // read-only bytes: still a write into the capability
    w16(c, 0x04, 0); // elsewhere: no hook
    expect(writes).toEqual([
      [12, 4, 0xcafef00d],
      [2, 2, 0xcafef00d],
    ]);
  });

  it("refuse malformed definitions", () => {
    expect(() => make({ capabilities: { vendor: [{ bytes: Uint8Array.from([PciCapId.VNDR, 0]) }] } })).toThrow(RangeError);
    expect(() => make({ capabilities: { vendor: [{ bytes: Uint8Array.from([PciCapId.MSI, 0, 4, 0]) }] } })).toThrow(/ID 0x5/);
    expect(() => make({ capabilities: { vendor: [{ bytes: vendorBytes(1), writable: new Uint8Array(4) }] } })).toThrow(/writable mask/);
    expect(() => make({ capabilities: { vendor: [{ bytes: new Uint8Array(200).fill(PciCapId.VNDR, 0, 1) }] } })).toThrow(RangeError);
    // together they must fit below 0x100
    const big = { bytes: new Uint8Array(100).fill(PciCapId.VNDR, 0, 1) };
    expect(() => make({ capabilities: { vendor: [big, big] } })).toThrow(/do not fit/);
  });
});
