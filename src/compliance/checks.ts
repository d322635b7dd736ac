/**
 * The checks every device must pass. Each runs against fresh devices served
 * by real servers (harness.ts) and talks to them only through the vfio-user
 * protocol, except where it compares the devices' saved state.
 */
import { IrqIndex, MigState, RegionIndex } from "../../protocol/constants.ts";
import type { Device, DeviceFactory, DeviceOptions } from "../device/api.ts";
import { normalizeState, packState, stateDifference, unpackState } from "../device/state.ts";
import { PciBaseAddress, PciCapId, PciCommand, PciHeader, PciMsi, PciMsix, PciStatus, barOffset } from "../pci/registers.ts";
import { VfioUserServer } from "../server/server.ts";
import { stateName } from "../client/client.ts";
import { GuestMemory } from "../client/guest-memory.ts";
import { MigrationDriver, type MigrationResult } from "../client/migration-driver.ts";
import type { Logger } from "pino";
import { DeviceUnderTest, barSlots, configDifferences, exercise, memoryDifference, walkCapabilityList } from "./harness.ts";

/** What a check gets to work with. */
export interface CheckContext {
  readonly factory: DeviceFactory;
  readonly options: DeviceOptions;
  readonly log: Logger;
  /** A fresh device on its own server and socket (closed when the check ends). */
  start(name: string): DeviceUnderTest;
  /** Records a failure; the check goes on to find more. */
  fail(message: string): void;
  /** Records something worth knowing that is not a failure. */
  note(message: string): void;
}

export interface Check {
  readonly id: string;
  readonly title: string;
  run(ctx: CheckContext): Promise<void>;
}

const hex = (n: number | bigint, width = 0): string => `0x${n.toString(16).padStart(width, "0")}`;

/** Capability IDs in the order the framework builds them from the definition. */
function declaredCapabilities(dev: Device): { id: number; name: string }[] {
  const c = dev.capabilities ?? {};
  const out: { id: number; name: string }[] = [];
  if (c.pm) out.push({ id: PciCapId.PM, name: "PM" });
  if (c.msi) out.push({ id: PciCapId.MSI, name: "MSI" });
  if (c.msix) out.push({ id: PciCapId.MSIX, name: "MSI-X" });
  if (c.pcie) out.push({ id: PciCapId.EXP, name: "PCI Express" });
  for (let i = 0; i < (c.vendor?.length ?? 0); i++) out.push({ id: PciCapId.VNDR, name: "vendor-specific" });
  return out;
}

const CAP_NAMES: Record<number, string> = {
  [PciCapId.PM]: "PM",
  [PciCapId.MSI]: "MSI",
  [PciCapId.MSIX]: "MSI-X",
  [PciCapId.EXP]: "PCI Express",
  [PciCapId.VNDR]: "vendor-specific",
};

function capName(id: number): string {
  return CAP_NAMES[id] ?? `id ${hex(id, 2)}`;
}

/** Connects a fresh device; its config space and power-on state. */
async function fresh(ctx: CheckContext, name = "dut"): Promise<DeviceUnderTest> {
  const dut = ctx.start(name);
  await dut.connect();
  return dut;
}

// ---------------------------------------------------------------------------

const deviceInfo: Check = {
  id: "device-info",
  title: "device, region and interrupt info match the definition",
  async run(ctx) {
    const dut = await fresh(ctx);
    const dev = dut.device;
    const c = dut.client;
    const info = await c.deviceInfo();
    if (info.num_regions < RegionIndex.NUM_REGIONS) ctx.fail(`DEVICE_GET_INFO num_regions ${info.num_regions}, a PCI device has ${RegionIndex.NUM_REGIONS}`);
    if (info.num_irqs < IrqIndex.NUM_IRQS) ctx.fail(`DEVICE_GET_INFO num_irqs ${info.num_irqs}, a PCI device has ${IrqIndex.NUM_IRQS}`);
    for (let slot = 0; slot < 6; slot++) {
      const bar = dev.bars.find((b) => b.index === slot);
      const r = await c.regionInfo(slot);
      const want = bar?.size ?? 0n;
      if (r.size !== want) ctx.fail(`region ${slot} (BAR${slot}) has size ${hex(r.size)}, the definition says ${hex(want)}`);
    }
    const rom = await c.regionInfo(RegionIndex.ROM);
    if (rom.size !== 0n) ctx.fail(`ROM region has size ${hex(rom.size)}; the device API has no expansion ROM`);
    const cfgSize = dev.capabilities?.pcie ? 4096 : 256;
    if (dut.configSize !== cfgSize) ctx.fail(`config region is ${dut.configSize} bytes, expected ${cfgSize}${dev.capabilities?.pcie ? " (PCI Express)" : ""}`);
    const irqs: [number, string, number][] = [
      [IrqIndex.INTX, "INTx", dev.interruptPin ? 1 : 0],
      [IrqIndex.MSI, "MSI", dev.capabilities?.msi?.vectors ?? 0],
      [IrqIndex.MSIX, "MSI-X", dev.capabilities?.msix?.vectors ?? 0],
    ];
    for (const [index, name, want] of irqs) {
      const r = await c.irqInfo(index);
      if (r.count !== want) ctx.fail(`${name} IRQ info reports ${r.count} vector(s), the definition gives ${want}`);
    }
  },
};

const configIdentity: Check = {
  id: "config-identity",
  title: "config space identity: vendor, device, class, revision, subsystem, header type 0, interrupt pin",
  async run(ctx) {
    const dut = await fresh(ctx);
    const id = dut.device.identity;
    const cfg = await dut.readConfig();
    const fields: [string, number, number, number][] = [
      ["vendor ID", cfg.readUInt16LE(PciHeader.VENDOR_ID), id.vendorId, 4],
      ["device ID", cfg.readUInt16LE(PciHeader.DEVICE_ID), id.deviceId, 4],
      ["class code", cfg.readUInt32LE(PciHeader.REVISION_ID) >>> 8, id.classCode, 6],
      ["revision", cfg[PciHeader.REVISION_ID]!, id.revision ?? 0, 2],
      ["subsystem vendor ID", cfg.readUInt16LE(PciHeader.SUBSYSTEM_VENDOR_ID), id.subsystemVendorId ?? 0, 4],
      ["subsystem ID", cfg.readUInt16LE(PciHeader.SUBSYSTEM_ID), id.subsystemId ?? 0, 4],
      ["interrupt pin", cfg[PciHeader.INTERRUPT_PIN]!, dut.device.interruptPin ?? 0, 2],
    ];
    for (const [name, got, want, w] of fields) if (got !== want) ctx.fail(`${name} reads ${hex(got, w)}, identity says ${hex(want, w)}`);
    const ht = cfg[PciHeader.HEADER_TYPE]!;
    if (ht !== 0) ctx.fail(`header type is ${hex(ht, 2)}, expected 0x00 (type 0, single function)`);
    if (id.vendorId === 0xffff || id.vendorId === 0) ctx.fail(`vendor ID ${hex(id.vendorId, 4)} is not a valid vendor`);
  },
};

const capabilityList: Check = {
  id: "capability-list",
  title: "status capability bit iff capabilities; list from 0x34 well formed, ids as declared",
  async run(ctx) {
    const dut = await fresh(ctx);
    const dev = dut.device;
    const cfg = await dut.readConfig();
    const declared = declaredCapabilities(dev);
    const status = cfg.readUInt16LE(PciHeader.STATUS);
    const capBit = (status & PciStatus.CAP_LIST) !== 0;
    if (capBit !== declared.length > 0) {
      ctx.fail(`status capability-list bit is ${capBit ? "set" : "clear"} but the device declares ${declared.length} capabilities`);
    }
    if (!capBit) {
      if (cfg[PciHeader.CAPABILITY_LIST] !== 0) ctx.fail(`no capability-list bit, but the pointer at 0x34 is ${hex(cfg[PciHeader.CAPABILITY_LIST]!, 2)}`);
      return;
    }
    let list: { id: number; offset: number }[];
    try {
      list = walkCapabilityList(cfg);
    } catch (err) {
      ctx.fail(`capability list: ${(err as Error).message}`);
      return;
    }
    const got = list.map((c) => capName(c.id)).join(", ");
    const want = declared.map((c) => c.name).join(", ");
    if (got !== want) ctx.fail(`capability list is [${got}], the device declares [${want}]`);
    const caps = dev.capabilities ?? {};
    for (const { id, offset } of list) {
      if (id === PciCapId.MSI && caps.msi) {
        const flags = cfg.readUInt16LE(offset + PciMsi.FLAGS);
        const mmc = 1 << ((flags & PciMsi.FLAGS_QMASK) >> PciMsi.FLAGS_QMASK_SHIFT);
        if (mmc !== caps.msi.vectors) ctx.fail(`MSI capability offers ${mmc} vector(s), declared ${caps.msi.vectors}`);
        const pvm = (flags & PciMsi.FLAGS_MASKBIT) !== 0;
        if (pvm !== (caps.msi.perVectorMask === true)) ctx.fail(`MSI per-vector masking is ${pvm ? "on" : "off"}, declared ${caps.msi.perVectorMask ? "on" : "off"}`);
        if (flags & PciMsi.FLAGS_ENABLE) ctx.fail("MSI is enabled at power-on");
      }
      if (id === PciCapId.MSIX && caps.msix) {
        const m = caps.msix;
        const flags = cfg.readUInt16LE(offset + PciMsix.FLAGS);
        const table = cfg.readUInt32LE(offset + PciMsix.TABLE);
        const pba = cfg.readUInt32LE(offset + PciMsix.PBA);
        if ((flags & PciMsix.FLAGS_QSIZE) + 1 !== m.vectors) ctx.fail(`MSI-X table size is ${(flags & PciMsix.FLAGS_QSIZE) + 1}, declared ${m.vectors}`);
        if ((table & PciMsix.BIR_MASK) !== m.tableBar || (table & PciMsix.OFFSET_MASK) >>> 0 !== m.tableOffset) {
          ctx.fail(`MSI-X table at BAR${table & 7}+${hex((table & PciMsix.OFFSET_MASK) >>> 0)}, declared BAR${m.tableBar}+${hex(m.tableOffset)}`);
        }
        if ((pba & PciMsix.BIR_MASK) !== m.pbaBar || (pba & PciMsix.OFFSET_MASK) >>> 0 !== m.pbaOffset) {
          ctx.fail(`MSI-X PBA at BAR${pba & 7}+${hex((pba & PciMsix.OFFSET_MASK) >>> 0)}, declared BAR${m.pbaBar}+${hex(m.pbaOffset)}`);
        }
        if (flags & PciMsix.FLAGS_ENABLE) ctx.fail("MSI-X is enabled at power-on");
      }
    }
    const vendor = list.filter((c) => c.id === PciCapId.VNDR);
    (caps.vendor ?? []).forEach((def, i) => {
      const at = vendor[i]?.offset;
      // a capability with live contents (a read hook) is only checked for its place in the list
      if (at === undefined || def.read) return;
      for (let b = 2; b < def.bytes.length; b++) {
        if (cfg[at + b] !== def.bytes[b]) {
          ctx.fail(`vendor-specific capability ${i} at ${hex(at)}: byte ${b} reads ${hex(cfg[at + b]!, 2)}, the definition says ${hex(def.bytes[b]!, 2)}`);
          break;
        }
      }
    });
    if (caps.pcie && cfg.length > 0x100) {
      // extended capabilities: a null header or a well-formed list from 0x100
      const seen = new Set<number>();
      for (let at = 0x100; at !== 0; ) {
        const header = cfg.readUInt32LE(at);
        if (header === 0) break;
        if (seen.has(at)) {
          ctx.fail(`extended capability list loops back to ${hex(at)}`);
          break;
        }
        seen.add(at);
        const next = header >>> 20;
        if (next !== 0 && (next < 0x100 || next & 3 || next + 4 > cfg.length)) {
          ctx.fail(`extended capability at ${hex(at)} points to ${hex(next)}`);
          break;
        }
        at = next;
      }
    }
  },
};

const barSizing: Check = {
  id: "bar-sizing",
  title: "BAR sizing with all-ones writes: size and type bits as defined, unused BARs and ROM read 0",
  async run(ctx) {
    const dut = await fresh(ctx);
    const dev = dut.device;
    const slotOwner = new Map<number, (typeof dev.bars)[number]>();
    for (const bar of dev.bars) for (const s of barSlots(bar)) slotOwner.set(s, bar);
    // as a guest does: decoding off while sizing
    await dut.writeConfig16(PciHeader.COMMAND, 0);
    for (let slot = 0; slot < 6; slot++) {
      const bar = slotOwner.get(slot);
      const at = barOffset(slot);
      if (!bar) {
        const before = await dut.config32(at);
        await dut.writeConfig32(at, 0xffff_ffff);
        const after = await dut.config32(at);
        await dut.writeConfig32(at, before);
        if (before !== 0 || after !== 0) ctx.fail(`unused BAR${slot} reads ${hex(before, 8)}, ${hex(after, 8)} after writing all ones; it must read 0`);
        continue;
      }
      if (bar.index !== slot) continue; // the upper half of a mem64 BAR is sized with its lower half
      const lo0 = await dut.config32(at);
      await dut.writeConfig32(at, 0xffff_ffff);
      const lo = await dut.config32(at);
      let hi = 0;
      let hi0 = 0;
      if (bar.kind === "mem64") {
        hi0 = await dut.config32(at + 4);
        await dut.writeConfig32(at + 4, 0xffff_ffff);
        hi = await dut.config32(at + 4);
        await dut.writeConfig32(at + 4, hi0);
      }
      await dut.writeConfig32(at, lo0);
      const restored = await dut.config32(at);
      if (restored !== lo0) ctx.fail(`BAR${slot} reads ${hex(restored, 8)} after restoring ${hex(lo0, 8)}`);
      const name = `BAR${slot} (${bar.kind}${bar.prefetchable ? ", prefetchable" : ""}, ${hex(bar.size)} bytes)`;
      // type bits
      if (bar.kind === "io") {
        if ((lo & 0x3) !== PciBaseAddress.SPACE_IO) ctx.fail(`${name}: low bits ${lo & 3} do not say I/O space`);
      } else {
        const type = lo & 0xf;
        const want = (bar.kind === "mem64" ? PciBaseAddress.MEM_TYPE_64 : PciBaseAddress.MEM_TYPE_32) | (bar.prefetchable ? PciBaseAddress.MEM_PREFETCH : 0);
        if (type !== want) ctx.fail(`${name}: type bits ${hex(type)} after sizing, expected ${hex(want)}`);
        if ((lo0 & 0xf) !== want) ctx.fail(`${name}: type bits ${hex(lo0 & 0xf)} at power-on, expected ${hex(want)}`);
      }
      // size: the writable address bits are exactly those above the size
      const width = bar.kind === "mem64" ? 64n : 32n;
      const mask = ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)) & ~BigInt(bar.kind === "io" ? 0x3 : 0xf);
      const want = ~(bar.size - 1n) & ((1n << width) - 1n) & ~BigInt(bar.kind === "io" ? 0x3 : 0xf);
      const io16 = bar.kind === "io" && mask === (want & 0xffffn); // a 16-bit I/O decoder is allowed
      if (mask !== want && !io16) {
        const low = mask & -mask;
        ctx.fail(`${name}: sizing reads back ${hex(mask)}, ${low === 0n ? "no writable bits" : `a size of ${hex(low)}`}; expected ${hex(want)}`);
      }
    }
    // expansion ROM: the device API has none, so the register is all zero
    const rom0 = await dut.config32(PciHeader.ROM_ADDRESS);
    await dut.writeConfig32(PciHeader.ROM_ADDRESS, 0xffff_ffff);
    const rom = await dut.config32(PciHeader.ROM_ADDRESS);
    await dut.writeConfig32(PciHeader.ROM_ADDRESS, rom0);
    if (rom0 !== 0 || rom !== 0) ctx.fail(`expansion ROM BAR reads ${hex(rom0, 8)}, ${hex(rom, 8)} after writing all ones; no ROM means 0`);
  },
};

const commandRegister: Check = {
  id: "command-register",
  title: "command register: memory, bus master (and I/O, INTx disable) writable; reserved bits 0; status not settable",
  async run(ctx) {
    const dut = await fresh(ctx);
    const dev = dut.device;
    const cmd0 = await dut.config16(PciHeader.COMMAND);
    if (cmd0 & (PciCommand.MEMORY | PciCommand.MASTER | PciCommand.IO)) ctx.fail(`command register is ${hex(cmd0, 4)} at power-on: decoding or bus mastering already on`);
    const must: [number, string][] = [
      [PciCommand.MEMORY, "memory space"],
      [PciCommand.MASTER, "bus master"],
    ];
    if (dev.bars.some((b) => b.kind === "io")) must.push([PciCommand.IO, "I/O space"]);
    if (dev.interruptPin) must.push([PciCommand.INTX_DISABLE, "INTx disable"]);
    for (const [bit, name] of must) {
      await dut.writeConfig16(PciHeader.COMMAND, bit);
      const on = await dut.config16(PciHeader.COMMAND);
      await dut.writeConfig16(PciHeader.COMMAND, 0);
      const off = await dut.config16(PciHeader.COMMAND);
      if ((on & bit) === 0) ctx.fail(`${name} bit (${hex(bit, 4)}) does not stay set: command reads ${hex(on, 4)}`);
      if ((off & bit) !== 0) ctx.fail(`${name} bit (${hex(bit, 4)}) does not clear: command reads ${hex(off, 4)}`);
    }
    await dut.writeConfig16(PciHeader.COMMAND, 0xffff);
    const all = await dut.config16(PciHeader.COMMAND);
    await dut.writeConfig16(PciHeader.COMMAND, 0);
    if (all & 0xf800) ctx.fail(`reserved command bits 15:11 read ${hex(all & 0xf800, 4)} after writing all ones`);
    const st0 = await dut.config16(PciHeader.STATUS);
    await dut.writeConfig16(PciHeader.STATUS, 0xffff);
    const st1 = await dut.config16(PciHeader.STATUS);
    await dut.writeConfig16(PciHeader.STATUS, 0);
    const st2 = await dut.config16(PciHeader.STATUS);
    if ((st0 & PciStatus.CAP_LIST) !== (st1 & PciStatus.CAP_LIST) || (st0 & PciStatus.CAP_LIST) !== (st2 & PciStatus.CAP_LIST)) {
      ctx.fail(`status capability-list bit changed by a guest write (${hex(st0, 4)} -> ${hex(st1, 4)} -> ${hex(st2, 4)})`);
    }
    if (st2 & ~st0 & 0xffff) ctx.fail(`writing the status register set bits ${hex(st2 & ~st0, 4)}`);
  },
};

const reset: Check = {
  id: "reset",
  title: "DEVICE_RESET restores power-on config space and device state",
  async run(ctx) {
    const dut = ctx.start("dut");
    // the state before any access is the power-on state
    const s0 = dut.state();
    const m0 = dut.memoryDigest();
    await dut.connect();
    const c0 = await dut.readConfig();
    const ex = await exercise(dut, 7, { config: true });
    if (!(await dut.settle())) ctx.note("the device state kept changing after the writes");
    const c1 = await dut.readConfig();
    const s1 = dut.state();
    const changed = stateDifference(s0, s1) !== null || (m0 !== null && dut.memoryDigest() !== m0);
    if (!changed) ctx.note(`the ${ex.writes} register writes left the device state as it was; only config space was changed before the reset`);
    if (configDifferences(c0, c1).length === 0) ctx.fail("config space did not change with the writes; the check cannot tell a reset happened");
    await dut.client.reset();
    const s2 = dut.state();
    const m2 = dut.memoryDigest();
    const c2 = await dut.readConfig();
    const cd = configDifferences(c2, c0);
    if (cd.length > 0) ctx.fail(`config space after reset differs from power-on (after vs power-on): ${cd.join("; ")}`);
    const sd = stateDifference(s2, s0);
    if (sd) ctx.fail(`saveState after reset differs from power-on (after vs power-on): ${sd}`);
    if (m0 !== m2) ctx.fail("device memory after reset differs from power-on");
    const mig = await dut.client.getMigState();
    if (mig !== MigState.RUNNING) ctx.fail(`migration state after reset is ${stateName(mig)}, expected RUNNING`);
  },
};

const stateRoundTrip: Check = {
  id: "state-roundtrip",
  title: "saveState -> msgpack -> loadState on a fresh instance -> saveState is equal",
  async run(ctx) {
    const dut = ctx.start("dut");
    const roundTrip = async (label: string, state: unknown): Promise<void> => {
      let packed: Uint8Array;
      try {
        packed = packState(state);
      } catch (err) {
        ctx.fail(`${label}: saveState is not msgpack-encodable: ${(err as Error).message}`);
        return;
      }
      // a fresh instance, attached to a server as a migration destination's is
      const other = ctx.factory.create(ctx.options);
      const server = new VfioUserServer({ device: other, log: ctx.log.child({ bench: "roundtrip" }) });
      try {
        other.loadState(unpackState(packed));
        const d = stateDifference(state, other.saveState());
        if (d) ctx.fail(`${label}: state after loadState differs (saved vs reloaded): ${d}`);
      } catch (err) {
        ctx.fail(`${label}: loadState refused what saveState produced: ${(err as Error).message}`);
      } finally {
        await server.close();
      }
    };
    await roundTrip("power-on state", dut.device.saveState());
    await dut.connect();
    await exercise(dut, 7, { config: true });
    await dut.settle();
    const s = dut.device.saveState();
    const fresh = ctx.factory.create(ctx.options);
    try {
      if (stateDifference(s, normalizeState(fresh.saveState())) === null) {
        ctx.note("the register writes left saveState at its power-on value");
      }
    } finally {
      await fresh.dispose?.();
    }
    await roundTrip("state after register writes", s);
  },
};

/** Source and destination state, config space and memory compared. */
async function compareEnds(ctx: CheckContext, src: DeviceUnderTest, dst: DeviceUnderTest, srcState: unknown, srcConfig: Buffer): Promise<void> {
  const dstConfig = await dst.readConfig();
  const cd = configDifferences(srcConfig, dstConfig);
  if (cd.length > 0) ctx.fail(`config space differs (source vs destination): ${cd.join("; ")}`);
  const sd = stateDifference(srcState, dst.state());
  if (sd) ctx.fail(`device state differs (source vs destination): ${sd}`);
  const sm = src.device.precopyMemory;
  const dm = dst.device.precopyMemory;
  if (sm && dm) {
    const md = memoryDifference(sm, dm);
    if (md) ctx.fail(md);
  }
}

async function expectState(ctx: CheckContext, side: string, got: number, want: number, what: string): Promise<boolean> {
  if (got === want) return true;
  ctx.fail(`${side}: ${what} left the device in ${stateName(got)}, expected ${stateName(want)}`);
  return false;
}

const migrationStopCopy: Check = {
  id: "migration-stop-copy",
  title: "migration between two servers: source STOP_COPY, destination RESUMING -> STOP -> RUNNING; same config and state",
  async run(ctx) {
    const src = await fresh(ctx, "source");
    const dst = await fresh(ctx, "destination");
    const cs = src.client;
    const cd = dst.client;
    await exercise(src, 7, { config: true });
    await src.settle();
    let r = await cs.setMigState(MigState.STOP_COPY);
    if (!(await expectState(ctx, "source", r.deviceState, MigState.STOP_COPY, "RUNNING -> STOP_COPY"))) return;
    const stream: Buffer[] = [];
    let bytes = 0;
    for (;;) {
      const chunk = await cs.migDataRead();
      if (chunk.length === 0) break;
      stream.push(Buffer.from(chunk));
      bytes += chunk.length;
    }
    if (bytes === 0) ctx.fail("source: STOP_COPY produced an empty stream");
    // the source is stopped: what it holds now is what it sent
    const srcState = src.state();
    const srcConfig = await src.readConfig();
    r = await cd.setMigState(MigState.RESUMING);
    if (!(await expectState(ctx, "destination", r.deviceState, MigState.RESUMING, "RUNNING -> RESUMING"))) return;
    for (const chunk of stream) await cd.migDataWrite(chunk);
    try {
      r = await cd.setMigState(MigState.STOP);
    } catch (err) {
      ctx.fail(`destination refused the stream (RESUMING -> STOP): ${(err as Error).message}`);
      return;
    }
    if (!(await expectState(ctx, "destination", r.deviceState, MigState.STOP, "RESUMING -> STOP"))) return;
    await compareEnds(ctx, src, dst, srcState, srcConfig);
    r = await cd.setMigState(MigState.RUNNING);
    await expectState(ctx, "destination", r.deviceState, MigState.RUNNING, "STOP -> RUNNING");
    r = await cs.setMigState(MigState.STOP);
    await expectState(ctx, "source", r.deviceState, MigState.STOP, "STOP_COPY -> STOP");
    ctx.note(`${bytes} bytes of device state`);
  },
};

const GUEST_RAM = 2n << 20n;

const migrationPrecopy: Check = {
  id: "migration-precopy",
  title: "live migration with PRE_COPY (migration driver, dirty logging, guest RAM): same config, state and memory",
  async run(ctx) {
    const src = await fresh(ctx, "source");
    const dst = await fresh(ctx, "destination");
    const srcRam = GuestMemory.create(GUEST_RAM, { name: "compliance-src" });
    const dstRam = GuestMemory.create(GUEST_RAM, { name: "compliance-dst" });
    try {
      await srcRam.mapInto(src.client);
      await dstRam.mapInto(dst.client);
      await exercise(src, 7, { config: true });
      await src.settle();
      let srcState: unknown = null;
      let srcConfig: Buffer | null = null;
      const driver = new MigrationDriver(
        { client: src.client, ram: srcRam },
        { client: dst.client, ram: dstRam },
        {
          // the workload's last writes land after pre-copy: they must reach the destination in stop-copy
          stopVm: async () => {
            await exercise(src, 9, { config: false });
            await src.settle();
          },
          beforeDestinationRunning: async () => {
            srcState = src.state();
            srcConfig = await src.readConfig();
            await compareEnds(ctx, src, dst, srcState, srcConfig);
          },
          onEvent: (m) => ctx.log.debug({ migration: m }, "driver"),
        },
      );
      let result: MigrationResult;
      try {
        result = await driver.run();
      } catch (err) {
        ctx.fail(`migration failed: ${(err as Error).message}`);
        return;
      }
      if (srcConfig === null) ctx.fail("the destination never reached STOP");
      if (!result.attach.source.preCopy) ctx.fail("the source does not offer PRE_COPY");
      if (result.rounds.length < 1) ctx.fail("no pre-copy round ran");
      const dstMig = await dst.client.getMigState();
      if (dstMig !== MigState.RUNNING) ctx.fail(`destination ends in ${stateName(dstMig)}, expected RUNNING`);
      const ramDiff = srcRam.firstDifference(dstRam);
      if (ramDiff >= 0) ctx.fail(`guest RAM differs after migration in page ${ramDiff}`);
      const mem = src.device.precopyMemory;
      if (mem) {
        const r1 = result.rounds[0];
        if (r1 && r1.initialBytes < mem.size) ctx.fail(`pre-copy info at the first round reported ${r1.initialBytes} initial bytes, less than the ${mem.size}-byte device memory`);
        if (BigInt(result.precopyDeviceBytes) < mem.size) ctx.fail(`only ${result.precopyDeviceBytes} bytes moved during pre-copy, less than the ${mem.size}-byte device memory`);
        const pages = Number(mem.size / BigInt(mem.pageSize));
        if (pages >= 64 && BigInt(result.stopCopyDeviceBytes) >= mem.size / 2n) {
          ctx.fail(`stop-copy moved ${result.stopCopyDeviceBytes} bytes: the memory sent in pre-copy was sent again (a few pages were re-dirtied)`);
        }
      }
      ctx.note(`${result.rounds.length} round(s); ${result.precopyDeviceBytes} bytes in pre-copy, ${result.stopCopyDeviceBytes} in stop-copy`);
    } finally {
      srcRam.close();
      dstRam.close();
    }
  },
};

/** Every check, in the order they run. */
export const CHECKS: readonly Check[] = [
  deviceInfo,
  configIdentity,
  capabilityList,
  barSizing,
  commandRegister,
  reset,
  stateRoundTrip,
  migrationStopCopy,
  migrationPrecopy,
];
