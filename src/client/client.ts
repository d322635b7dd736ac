/**
 * A vfio-user client: the other end of the server, in TypeScript. It does
 * what a VMM such as QEMU does on the wire (negotiate, describe the device,
 * access regions, share guest memory, wire interrupts, drive migration), so
 * a device developer can exercise a device model without a VM, and the
 * migration driver can move a device between two servers.
 *
 * One FrameDecoder takes everything the server sends: replies (matched to
 * requests by msg_id and command) and the server's own requests, DMA_READ
 * and DMA_WRITE, which are served from memory the client registered as
 * socket-backed (`dmaMap` with a `buffer` and no fd). Requests may be
 * pipelined; the server answers in order. Each request has a timeout; a
 * reply with the error bit rejects with `VfioUserError(errno)`.
 *
 * 64-bit quantities (IOVAs, offsets, sizes) are bigint.
 */
import { readSync } from "node:fs";
import {
  COMMAND_NAMES,
  Command,
  Defaults,
  DmaMapFlags,
  DmaUnmapFlags,
  Errno,
  Feature,
  FeatureFlags,
  HEADER_SIZE,
  HeaderFlags,
  IrqSetFlags,
  MessageSize,
  MigState,
  type MigState as MigStateValue,
} from "../../protocol/constants.ts";
import { U32_MAX } from "../../protocol/u64.ts";
import { parseCapabilities, serializeCapabilities, type Capabilities } from "../../protocol/capabilities.ts";
import { VfioUserError } from "../../protocol/errors.ts";
import { PendingRequests } from "../../protocol/pending-requests.ts";
import { FrameDecoder, commandHeader, encodeErrorReply, encodeMessage, encodeReply, maxFrameSizeFor, type Frame } from "../../protocol/frame.ts";
import { decodeDeviceFeatureReply, encodeDeviceFeatureParts, type DeviceFeatureReply } from "../../protocol/messages/device-feature.ts";
import {
  decodeDmaLoggingReportReply,
  decodeFeatureMigDataSize,
  decodeFeatureMigState,
  decodeFeatureMigration,
  dmaLoggingBitmapSize,
  encodeDmaLoggingControl,
  encodeDmaLoggingReportRequest,
  encodeFeatureMigState,
  decodeDmaLoggingControl,
  type DmaLoggingRange,
} from "../../protocol/messages/device-feature-data.ts";
import { decodeDeviceGetInfoReply, encodeDeviceGetInfoRequest, type DeviceGetInfoReply } from "../../protocol/messages/device-get-info.ts";
import { decodeDeviceGetIrqInfoReply, encodeDeviceGetIrqInfoRequest, type DeviceGetIrqInfoReply } from "../../protocol/messages/device-get-irq-info.ts";
import {
  decodeDeviceGetRegionInfoReply,
  encodeDeviceGetRegionInfoRequest,
  type DeviceGetRegionInfoReply,
} from "../../protocol/messages/device-get-region-info.ts";
import {
  decodeDeviceGetRegionIoFdsReply,
  encodeDeviceGetRegionIoFdsRequest,
  type DeviceGetRegionIoFdsReply,
} from "../../protocol/messages/device-get-region-io-fds.ts";
import { encodeDeviceSetIrqsRequest } from "../../protocol/messages/device-set-irqs.ts";
import { encodeDmaMapRequest } from "../../protocol/messages/dma-map.ts";
import { decodeDmaReadRequest, encodeDmaReadReplyParts } from "../../protocol/messages/dma-read.ts";
import { encodeDmaUnmapRequest } from "../../protocol/messages/dma-unmap.ts";
import { decodeDmaWriteRequest } from "../../protocol/messages/dma-write.ts";
import { decodeMigDataReadReply, encodeMigDataReadRequest, encodeMigDataWriteRequestParts } from "../../protocol/messages/mig-data.ts";
import { decodeMigGetPrecopyInfoReply, encodeMigGetPrecopyInfoRequest } from "../../protocol/messages/mig-get-precopy-info.ts";
import { decodeRegionReadReply, encodeRegionReadRequest } from "../../protocol/messages/region-read.ts";
import { encodeRegionWriteRequestParts } from "../../protocol/messages/region-write.ts";
import { decodeVersion, encodeVersion } from "../../protocol/messages/version.ts";
import { native } from "../transport/native.ts";
import type { Transport } from "../transport/types.ts";
import { UnixConnection } from "../transport/unix-socket.ts";

/** Default time a request may wait for its reply. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;
/** What the client offers by default in VERSION (QEMU's values). */
export const CLIENT_MAX_DATA_XFER_SIZE = 1 << 20;
export const CLIENT_MAX_MSG_FDS = 16;
/** Header, DEVICE_FEATURE fixed part and DMA_LOGGING_REPORT data in front of a report's bitmap. */
const REPORT_REPLY_OVERHEAD = HEADER_SIZE + MessageSize.DEVICE_FEATURE_FIXED + MessageSize.DMA_LOGGING_REPORT_FIXED;

/** The connection went away (or was never usable) while a request was outstanding. */
export class ConnectionClosedError extends Error {
  readonly code = "ECONNRESET";
  constructor(message: string) {
    super(message);
    this.name = "ConnectionClosedError";
  }
}

/** No reply within the request timeout. */
export class RequestTimeoutError extends Error {
  readonly code = "ETIMEDOUT";
  constructor(message: string) {
    super(message);
    this.name = "RequestTimeoutError";
  }
}

export interface ClientOptions {
  /** How long each request waits for its reply (default 30 s). */
  requestTimeoutMs?: number;
  /**
   * Keep retrying connect() while the socket is missing or refuses (ENOENT,
   * ECONNREFUSED) for this long (default 0: one attempt).
   */
  connectTimeoutMs?: number;
  /** Largest data transfer offered in VERSION and accepted from the server (default 1 MiB). */
  maxDataXferSize?: number;
}

export interface DmaMapOptions {
  iova: bigint;
  size: bigint;
  /** Memory shared with the server; it maps [offset, offset + size) of this fd. The caller keeps its fd. */
  fd?: number;
  offset?: bigint;
  /** The device may read this memory (default true). */
  readable?: boolean;
  /** The device may write this memory (default true). */
  writable?: boolean;
  /**
   * Without an fd: the bytes behind the region, served to the server's
   * DMA_READ / DMA_WRITE requests (must be `size` bytes long).
   */
  buffer?: Buffer;
}

export interface RegionWriteOptions {
  /** Send with No_reply: resolves once sent; errors are not reported. */
  posted?: boolean;
}

export interface MigStateReply {
  deviceState: MigStateValue;
  dataFd: number;
}

/** A DEVICE_FEATURE reply; data is the client's own copy. */
export interface FeatureReply extends DeviceFeatureReply {
  data: Buffer;
}

export interface PrecopyInfo {
  initialBytes: bigint;
  dirtyBytes: bigint;
}

/** Counters of the server-to-client DMA requests served. */
export interface SocketDmaStats {
  reads: number;
  writes: number;
  bytesRead: number;
  bytesWritten: number;
  refused: number;
}


interface SocketRegion {
  iova: bigint;
  size: bigint;
  readable: boolean;
  writable: boolean;
  buffer: Buffer | null;
}

const EMPTY = new Uint8Array(0);
/** Config space region and the few registers a guest driver touches (pci_regs.h). */
const PCI_CONFIG_REGION = 7;
const PCI_COMMAND = 0x04;
const PCI_STATUS = 0x06;
const PCI_STATUS_CAP_LIST = 0x10;
const PCI_CAPABILITY_LIST = 0x34;
export const PCI_CAP_ID_MSI = 0x05;

export class VfioUserClient {
  readonly transport: Transport;
  /** The server's capabilities after negotiate(). */
  serverCapabilities: Capabilities | null = null;
  /** Largest transfer in one message, after negotiation. */
  maxDataXferSize: number;
  /**
   * Largest DMA_LOGGING_REPORT bitmap asked for in one request, after
   * negotiation: the smaller of both sides' migration.max_bitmap_size (a
   * DEVICE_FEATURE reply is bounded by argsz, not by max_data_xfer_size);
   * without a migration capability from the server, what fits
   * max_data_xfer_size.
   */
  maxBitmapSize: number;
  readonly socketDma: SocketDmaStats = { reads: 0, writes: 0, bytesRead: 0, bytesWritten: 0, refused: 0 };
  /** Resolves when the connection is closed, by either side. */
  readonly closedPromise: Promise<Error | undefined>;

  private readonly decoder: FrameDecoder;
  private readonly pending: PendingRequests;
  private readonly regions: SocketRegion[] = [];
  private readonly timeoutMs: number;
  private readonly offeredXferSize: number;
  private _closed = false;
  /** msgIds whose reply fds the caller takes (see request). */
  private readonly keepReplyFds = new Set<number>();
  private closeReason: Error | undefined;
  private resolveClosed!: (err: Error | undefined) => void;

  /** Connects to a server's UNIX socket. */
  static async connect(socketPath: string, opts: ClientOptions = {}): Promise<VfioUserClient> {
    const deadline = Date.now() + (opts.connectTimeoutMs ?? 0);
    for (;;) {
      try {
        return new VfioUserClient(UnixConnection.connect(socketPath), opts);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code !== "ENOENT" && code !== "ECONNREFUSED") || Date.now() >= deadline) throw err;
        await new Promise((r) => setTimeout(r, 25));
      }
    }
  }

  /** A client over any transport (an in-memory pair in tests). */
  constructor(transport: Transport, opts: ClientOptions = {}) {
    this.transport = transport;
    this.timeoutMs = opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.pending = new PendingRequests(
      this.timeoutMs,
      (command, msgId) => new RequestTimeoutError(`${COMMAND_NAMES[command]} (msg ${msgId}) got no reply within ${this.timeoutMs} ms`),
    );
    this.offeredXferSize = opts.maxDataXferSize ?? CLIENT_MAX_DATA_XFER_SIZE;
    this.maxDataXferSize = Math.min(this.offeredXferSize, Defaults.MAX_DATA_XFER_SIZE);
    this.maxBitmapSize = Math.max(8, this.maxDataXferSize - 64);
    this.closedPromise = new Promise((resolve) => (this.resolveClosed = resolve));
    this.decoder = new FrameDecoder({
      maxFrameSize: maxFrameSizeFor(this.offeredXferSize),
      onFrame: (frame) => this.onFrame(frame),
    });
    transport.start({
      data: (chunk, fds) => this.onData(chunk, fds),
      close: (err) => this.onClose(err),
    });
  }

  get closed(): boolean {
    return this._closed;
  }

  /** Closes the connection; outstanding requests reject with ConnectionClosedError. */
  close(): void {
    if (this._closed) return;
    this.closeReason ??= new ConnectionClosedError("the client closed the connection");
    this.transport.close();
    this.onClose();
  }

  // ---------------------------------------------------------------------
  // Session
  // ---------------------------------------------------------------------

  /**
   * VERSION 0.0 with JSON capabilities like QEMU's (max_msg_fds 16,
   * max_data_xfer_size 1 MiB, migration {pgsize 4096, max_bitmap_size}).
   * Returns the server's capabilities.
   */
  async negotiate(caps: Partial<Capabilities> = {}): Promise<Capabilities> {
    const offer: Partial<Capabilities> = {
      max_msg_fds: CLIENT_MAX_MSG_FDS,
      max_data_xfer_size: this.offeredXferSize,
      migration: { pgsize: BigInt(Defaults.MIGRATION_PGSIZE), max_bitmap_size: Defaults.MAX_BITMAP_SIZE },
      ...caps,
    };
    // accept what is offered: a report reply as large as the bitmap offered
    const offeredBitmap = offer.migration?.max_bitmap_size ?? 0;
    this.decoder.maxFrameSize = Math.max(this.decoder.maxFrameSize, Math.min(U32_MAX, REPORT_REPLY_OVERHEAD + offeredBitmap));
    const frame = await this.request(Command.VERSION, encodeVersion({ major: 0, minor: 0, data: serializeCapabilities(offer) }));
    const v = decodeVersion(frame.body);
    if (v.major !== 0) throw new VfioUserError(Errno.ENOTSUP, `server answered protocol major ${v.major}`);
    const server = parseCapabilities(v.data);
    this.serverCapabilities = server;
    this.maxDataXferSize = Math.min(server.max_data_xfer_size, offer.max_data_xfer_size ?? this.offeredXferSize);
    this.maxBitmapSize = server.migration && offer.migration
      ? Math.max(8, Math.min(server.migration.max_bitmap_size, offeredBitmap))
      : Math.max(8, this.maxDataXferSize - 64);
    return server;
  }

  async deviceInfo(): Promise<DeviceGetInfoReply> {
    const frame = await this.request(Command.DEVICE_GET_INFO, encodeDeviceGetInfoRequest({ argsz: MessageSize.DEVICE_INFO }));
    return decodeDeviceGetInfoReply(frame.body);
  }

  /** Region info; asks again with room for the capabilities when the server reports more. */
  async regionInfo(index: number): Promise<DeviceGetRegionInfoReply> {
    let argsz: number = MessageSize.REGION_INFO;
    for (let attempt = 0; ; attempt++) {
      const frame = await this.request(Command.DEVICE_GET_REGION_INFO, encodeDeviceGetRegionInfoRequest({ argsz, index }));
      const info = decodeDeviceGetRegionInfoReply(frame.body);
      if (info.argsz <= argsz || attempt > 0) return info;
      argsz = info.argsz;
    }
  }

  /**
   * GET_REGION_IO_FDS: the region's sub-regions served by fds (doorbells as
   * ioeventfds) and the fds, which the caller now owns (close them). Asks
   * again with room for the array when the first reply says it needs more.
   */
  async regionIoFds(index: number): Promise<{ reply: DeviceGetRegionIoFdsReply; fds: number[] }> {
    let argsz: number = MessageSize.REGION_IO_FDS_FIXED;
    for (let attempt = 0; ; attempt++) {
      const frame = await this.request(Command.DEVICE_GET_REGION_IO_FDS, encodeDeviceGetRegionIoFdsRequest({ argsz, index }), [], true);
      const fds = frame.fds.splice(0);
      const reply = decodeDeviceGetRegionIoFdsReply(frame.body);
      if (reply.argsz <= argsz || attempt > 0) return { reply, fds };
      for (const fd of fds) native.close(fd);
      argsz = reply.argsz;
    }
  }

  async irqInfo(index: number): Promise<DeviceGetIrqInfoReply> {
    const frame = await this.request(Command.DEVICE_GET_IRQ_INFO, encodeDeviceGetIrqInfoRequest({ argsz: MessageSize.IRQ_INFO, index }));
    return decodeDeviceGetIrqInfoReply(frame.body);
  }

  // ---------------------------------------------------------------------
  // Region access
  // ---------------------------------------------------------------------

  /** Reads `count` bytes, in as many messages as max_data_xfer_size needs. */
  async regionRead(region: number, offset: bigint | number, count: number): Promise<Buffer> {
    const base = BigInt(offset);
    const max = this.maxDataXferSize;
    if (count <= max) return this.regionReadOne(region, base, count);
    const parts: Promise<Buffer>[] = [];
    for (let done = 0; done < count; done += max) parts.push(this.regionReadOne(region, base + BigInt(done), Math.min(max, count - done)));
    return Buffer.concat(await Promise.all(parts));
  }

  private async regionReadOne(region: number, offset: bigint, count: number): Promise<Buffer> {
    const frame = await this.request(Command.REGION_READ, encodeRegionReadRequest({ offset, region, count }));
    const r = decodeRegionReadReply(frame.body);
    if (r.count !== count || r.data.length !== count) {
      throw new VfioUserError(Errno.EIO, `REGION_READ returned ${r.data.length} bytes, asked ${count}`);
    }
    return Buffer.from(r.data.buffer, r.data.byteOffset, r.data.byteLength);
  }

  async regionWrite(region: number, offset: bigint | number, data: Uint8Array, opts: RegionWriteOptions = {}): Promise<void> {
    const base = BigInt(offset);
    const max = this.maxDataXferSize;
    const sends: Promise<unknown>[] = [];
    // an empty write still goes out (the server decides what it means)
    let done = 0;
    do {
      const piece = data.subarray(done, Math.min(data.length, done + max));
      const parts = encodeRegionWriteRequestParts({ offset: base + BigInt(done), region, count: piece.length, data: piece });
      if (opts.posted) this.post(Command.REGION_WRITE, parts);
      else sends.push(this.request(Command.REGION_WRITE, parts));
      done += piece.length;
    } while (done < data.length);
    await Promise.all(sends);
  }

  async readU32(region: number, offset: bigint | number): Promise<number> {
    return (await this.regionRead(region, offset, 4)).readUInt32LE(0);
  }

  async writeU32(region: number, offset: bigint | number, value: number, opts?: RegionWriteOptions): Promise<void> {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32LE(value >>> 0, 0);
    await this.regionWrite(region, offset, b, opts);
  }

  async readU64(region: number, offset: bigint | number): Promise<bigint> {
    return (await this.regionRead(region, offset, 8)).readBigUInt64LE(0);
  }

  async writeU64(region: number, offset: bigint | number, value: bigint, opts?: RegionWriteOptions): Promise<void> {
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64LE(value, 0);
    await this.regionWrite(region, offset, b, opts);
  }

  // ---------------------------------------------------------------------
  // Config space, as a guest driver uses it (region 7)
  // ---------------------------------------------------------------------

  /** Offset of the first capability with this id in the standard list, or -1. */
  async findCapability(id: number): Promise<number> {
    const cfg = await this.regionRead(PCI_CONFIG_REGION, 0, 0x100);
    if ((cfg.readUInt16LE(PCI_STATUS) & PCI_STATUS_CAP_LIST) === 0) return -1;
    let at = cfg[PCI_CAPABILITY_LIST]! & 0xfc;
    for (let hops = 0; at >= 0x40 && hops < 48; hops++) {
      if (cfg[at] === id) return at;
      at = cfg[at + 1]! & 0xfc;
    }
    return -1;
  }

  /** Sets memory decoding and/or bus mastering in the command register (what a driver's enable does). */
  async enableDevice(opts: { memory?: boolean; busMaster?: boolean; io?: boolean } = { memory: true, busMaster: true }): Promise<number> {
    const cmd = (await this.regionRead(PCI_CONFIG_REGION, PCI_COMMAND, 2)).readUInt16LE(0);
    let next = cmd;
    if (opts.io) next |= 0x1;
    if (opts.memory) next |= 0x2;
    if (opts.busMaster) next |= 0x4;
    const b = Buffer.alloc(2);
    b.writeUInt16LE(next, 0);
    await this.regionWrite(PCI_CONFIG_REGION, PCI_COMMAND, b);
    return next;
  }

  /** Programs and enables MSI (one vector) like a guest driver; false when the device has no MSI. */
  async enableMsi(address = 0xfee0_0000n, data = 0x4041): Promise<boolean> {
    const cap = await this.findCapability(PCI_CAP_ID_MSI);
    if (cap < 0) return false;
    const flags = (await this.regionRead(PCI_CONFIG_REGION, cap + 2, 2)).readUInt16LE(0);
    const is64 = (flags & 0x80) !== 0;
    await this.writeU32(PCI_CONFIG_REGION, cap + 4, Number(address & 0xffff_fffcn));
    if (is64) await this.writeU32(PCI_CONFIG_REGION, cap + 8, Number(address >> 32n));
    const d = Buffer.alloc(2);
    d.writeUInt16LE(data, 0);
    await this.regionWrite(PCI_CONFIG_REGION, cap + (is64 ? 12 : 8), d);
    const f = Buffer.alloc(2);
    f.writeUInt16LE((flags & ~0x70) | 0x1, 0); // one vector, enabled
    await this.regionWrite(PCI_CONFIG_REGION, cap + 2, f);
    return true;
  }

  // ---------------------------------------------------------------------
  // DMA regions
  // ---------------------------------------------------------------------

  /**
   * Shares memory with the device. With `fd`, the server maps it and DMAs
   * straight into it; without, the server asks the client (DMA_READ /
   * DMA_WRITE), served from `buffer`.
   */
  async dmaMap(m: DmaMapOptions): Promise<void> {
    const readable = m.readable ?? true;
    const writable = m.writable ?? true;
    if (m.buffer && m.fd !== undefined) throw new RangeError("dmaMap: give either an fd or a buffer, not both");
    if (m.buffer && BigInt(m.buffer.length) !== m.size) throw new RangeError(`dmaMap: buffer of ${m.buffer.length} bytes for a region of ${m.size}`);
    const flags = (readable ? DmaMapFlags.READ : 0) | (writable ? DmaMapFlags.WRITE : 0);
    const body = encodeDmaMapRequest({ argsz: MessageSize.DMA_MAP, flags, offset: m.offset ?? 0n, address: m.iova, size: m.size });
    await this.request(Command.DMA_MAP, body, m.fd !== undefined ? [m.fd] : []);
    if (m.fd === undefined) {
      this.regions.push({ iova: m.iova, size: m.size, readable, writable, buffer: m.buffer ?? null });
      this.regions.sort((a, b) => (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0));
    }
  }

  async dmaUnmap(iova: bigint, size: bigint): Promise<void> {
    await this.request(Command.DMA_UNMAP, encodeDmaUnmapRequest({ argsz: MessageSize.DMA_UNMAP, flags: 0, address: iova, size }));
    const i = this.regions.findIndex((r) => r.iova === iova && r.size === size);
    if (i >= 0) this.regions.splice(i, 1);
  }

  /** DMA_UNMAP with VFIO_DMA_UNMAP_FLAG_ALL, as QEMU sends it. */
  async dmaUnmapAll(): Promise<void> {
    await this.request(Command.DMA_UNMAP, encodeDmaUnmapRequest({ argsz: MessageSize.DMA_UNMAP, flags: DmaUnmapFlags.ALL, address: 0n, size: 0n }));
    this.regions.length = 0;
  }

  // ---------------------------------------------------------------------
  // Interrupts
  // ---------------------------------------------------------------------

  /** Wires vectors start.. of `index` to eventfds (-1 unassigns one). The caller keeps its fds. */
  async setIrqEventfds(index: number, start: number, fds: readonly number[]): Promise<void> {
    const flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER;
    const body = encodeDeviceSetIrqsRequest({ argsz: MessageSize.IRQ_SET_FIXED, flags, index, start, count: fds.length });
    await this.request(Command.DEVICE_SET_IRQS, body, fds);
  }

  /** Tears the whole index down (DATA_NONE + TRIGGER, count 0). */
  async disableIrqs(index: number): Promise<void> {
    const flags = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER;
    await this.request(Command.DEVICE_SET_IRQS, encodeDeviceSetIrqsRequest({ argsz: MessageSize.IRQ_SET_FIXED, flags, index, start: 0, count: 0 }));
  }

  /** Unmasks vectors (INTx is automasked after each delivery). */
  async unmaskIrq(index: number, start = 0, count = 1): Promise<void> {
    const flags = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK;
    await this.request(Command.DEVICE_SET_IRQS, encodeDeviceSetIrqsRequest({ argsz: MessageSize.IRQ_SET_FIXED, flags, index, start, count }));
  }

  async reset(): Promise<void> {
    await this.request(Command.DEVICE_RESET, EMPTY);
  }

  // ---------------------------------------------------------------------
  // Device features and migration
  // ---------------------------------------------------------------------

  /**
   * DEVICE_FEATURE with raw flags (feature | GET/SET/PROBE) and data.
   * `argsz` defaults to the request's own size (room for a SET/PROBE echo).
   */
  async feature(flags: number, data: Uint8Array = EMPTY, argsz?: number): Promise<FeatureReply> {
    const size = argsz ?? MessageSize.DEVICE_FEATURE_FIXED + data.length;
    const frame = await this.request(Command.DEVICE_FEATURE, encodeDeviceFeatureParts({ argsz: size, flags, data }));
    const r = decodeDeviceFeatureReply(frame.body);
    return { argsz: r.argsz, flags: r.flags, data: Buffer.from(r.data) };
  }

  /** PROBE: true when the feature supports `ops` (0 = merely exists), false on ENOTSUP/EINVAL. */
  async probeFeature(feature: number, ops = 0): Promise<boolean> {
    try {
      await this.feature(feature | ops | FeatureFlags.PROBE);
      return true;
    } catch (err) {
      if (err instanceof VfioUserError && (err.errno === Errno.ENOTSUP || err.errno === Errno.EINVAL)) return false;
      throw err;
    }
  }

  /** VFIO_DEVICE_FEATURE_MIGRATION: MigrationFlags (STOP_COPY, P2P, PRE_COPY). */
  async migrationFlags(): Promise<bigint> {
    const r = await this.feature(Feature.MIGRATION | FeatureFlags.GET, EMPTY, MessageSize.DEVICE_FEATURE_FIXED + MessageSize.FEATURE_MIGRATION);
    return decodeFeatureMigration(r.data).flags;
  }

  async getMigState(): Promise<MigStateValue> {
    const r = await this.feature(Feature.MIG_DEVICE_STATE | FeatureFlags.GET, EMPTY, MessageSize.DEVICE_FEATURE_FIXED + MessageSize.FEATURE_MIG_STATE);
    return decodeFeatureMigState(r.data).device_state as MigStateValue;
  }

  /** Requests a device state (data_fd 0, as QEMU leaves it); the reply carries the new state and data_fd. */
  async setMigState(state: MigStateValue): Promise<MigStateReply> {
    const r = await this.feature(Feature.MIG_DEVICE_STATE | FeatureFlags.SET, encodeFeatureMigState({ device_state: state, data_fd: 0 }));
    const s = decodeFeatureMigState(r.data);
    return { deviceState: s.device_state as MigStateValue, dataFd: s.data_fd };
  }

  /** VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: bytes a STOP_COPY would still produce. */
  async migDataSize(): Promise<bigint> {
    const r = await this.feature(Feature.MIG_DATA_SIZE | FeatureFlags.GET, EMPTY, MessageSize.DEVICE_FEATURE_FIXED + MessageSize.FEATURE_MIG_DATA_SIZE);
    return decodeFeatureMigDataSize(r.data).stop_copy_length;
  }

  /** MIG_GET_PRECOPY_INFO (this project's command 19). */
  async precopyInfo(): Promise<PrecopyInfo> {
    const frame = await this.request(Command.MIG_GET_PRECOPY_INFO, encodeMigGetPrecopyInfoRequest({ argsz: MessageSize.PRECOPY_INFO, flags: 0 }));
    const r = decodeMigGetPrecopyInfoReply(frame.body);
    return { initialBytes: r.initial_bytes, dirtyBytes: r.dirty_bytes };
  }

  /**
   * Up to `max` bytes of the migration stream (at most max_data_xfer_size).
   * Fewer: nothing more for now (PRE_COPY) or the end (STOP_COPY).
   */
  async migDataRead(max: number = this.maxDataXferSize): Promise<Buffer> {
    const size = Math.min(max, this.maxDataXferSize);
    const frame = await this.request(Command.MIG_DATA_READ, encodeMigDataReadRequest({ argsz: MessageSize.MIG_DATA_FIXED + size, size }));
    const r = decodeMigDataReadReply(frame.body);
    if (r.data.length > size) throw new VfioUserError(Errno.EIO, `MIG_DATA_READ returned ${r.data.length} bytes, asked ${size}`);
    return Buffer.from(r.data.buffer, r.data.byteOffset, r.data.byteLength);
  }

  /** Appends to the destination's stream, in max_data_xfer_size pieces. */
  async migDataWrite(data: Uint8Array): Promise<void> {
    const max = this.maxDataXferSize;
    const sends: Promise<unknown>[] = [];
    for (let done = 0; done < data.length; done += max) {
      const piece = data.subarray(done, Math.min(data.length, done + max));
      const parts = encodeMigDataWriteRequestParts({ argsz: MessageSize.MIG_DATA_FIXED + piece.length, size: piece.length, data: piece });
      sends.push(this.request(Command.MIG_DATA_WRITE, parts));
    }
    await Promise.all(sends);
  }

  /** DMA_LOGGING_START; returns the page size the server chose. */
  async dmaLoggingStart(pageSize: bigint, ranges: readonly DmaLoggingRange[]): Promise<bigint> {
    const data = encodeDmaLoggingControl({ page_size: pageSize, ranges: [...ranges] });
    const r = await this.feature(Feature.DMA_LOGGING_START | FeatureFlags.SET, data);
    return r.data.length >= MessageSize.DMA_LOGGING_CONTROL_FIXED ? decodeDmaLoggingControl(r.data).page_size : pageSize;
  }

  async dmaLoggingStop(): Promise<void> {
    await this.feature(Feature.DMA_LOGGING_STOP | FeatureFlags.SET);
  }

  /**
   * DMA_LOGGING_REPORT over [iova, iova + length): the dirty bitmap (bit n
   * = page n, LSB first within each byte), cleared on the server as it is
   * reported. Split into several requests when one bitmap would exceed the
   * negotiated max_bitmap_size (`maxBitmapSize`); each piece covers a
   * multiple of 64 pages so the pieces join byte-aligned.
   */
  async dmaLoggingReport(iova: bigint, length: bigint, pageSize: bigint): Promise<Uint8Array> {
    const maxBitmap = BigInt(this.maxBitmapSize);
    const pagesPerPiece = (maxBitmap / 8n) * 64n;
    const bytesPerPiece = pagesPerPiece * pageSize;
    const out = new Uint8Array(Number(dmaLoggingBitmapSize(length, pageSize)));
    let at = 0;
    for (let done = 0n; done < length; done += bytesPerPiece) {
      const n = length - done < bytesPerPiece ? length - done : bytesPerPiece;
      const bitmapBytes = dmaLoggingBitmapSize(n, pageSize);
      const req = encodeDmaLoggingReportRequest({ iova: iova + done, length: n, page_size: pageSize });
      const argsz = MessageSize.DEVICE_FEATURE_FIXED + MessageSize.DMA_LOGGING_REPORT_FIXED + Number(bitmapBytes);
      const r = await this.feature(Feature.DMA_LOGGING_REPORT | FeatureFlags.GET, req, argsz);
      const rep = decodeDmaLoggingReportReply(r.data);
      if (BigInt(rep.bitmap.length) !== bitmapBytes) {
        throw new VfioUserError(Errno.EIO, `DMA_LOGGING_REPORT bitmap of ${rep.bitmap.length} bytes, expected ${bitmapBytes}`);
      }
      out.set(rep.bitmap, at);
      at += rep.bitmap.length;
    }
    return out;
  }

  // ---------------------------------------------------------------------
  // Messaging
  // ---------------------------------------------------------------------

  /** Sends a command and resolves with its reply frame; rejects on an error reply, timeout or close. */
  /**
   * Sends a command and resolves with its reply frame; rejects on an error
   * reply, timeout or close. With `keepFds` the reply's fds stay in the
   * frame for the caller (who must close them); otherwise they are closed.
   */
  request(command: number, body: Uint8Array | readonly Uint8Array[], fds: readonly number[] = [], keepFds = false): Promise<Frame> {
    if (this._closed) return Promise.reject(this.closedError());
    return this.pending.start(command, (msgId) => {
      if (keepFds) this.keepReplyFds.add(msgId);
      this.send(encodeMessage(commandHeader(msgId, command), body), fds);
    });
  }

  /** Sends a command with No_reply. */
  private post(command: number, body: Uint8Array | readonly Uint8Array[]): void {
    if (this._closed) throw this.closedError();
    this.send(encodeMessage(commandHeader(this.pending.nextId(), command, true), body));
  }

  private send(buffers: Buffer[], fds: readonly number[] = []): void {
    if (fds.length === 0 || this.transport instanceof UnixConnection) {
      // the socket transport copies (dups) what it cannot send at once: the caller keeps its fds
      this.transport.send(buffers, fds);
      return;
    }
    // other transports pass ownership on: hand over duplicates
    this.transport.send(buffers, fds.map((fd) => (fd < 0 ? fd : native.dup(fd))));
  }

  private onData(chunk: Buffer, fds: number[]): void {
    try {
      this.decoder.push(chunk, fds);
    } catch (err) {
      for (const fd of this.decoder.close()) native.close(fd);
      this.closeReason = new ConnectionClosedError(`bad frame from the server: ${(err as Error).message}`);
      this.transport.close();
    }
  }

  private onFrame(frame: Frame): void {
    const h = frame.header;
    const isReply = (h.flags & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_REPLY;
    // only replies to requests that asked for them keep their fds
    if (!(isReply && this.keepReplyFds.delete(h.msgId) && (h.flags & HeaderFlags.ERROR) === 0)) {
      for (const fd of frame.fds) native.close(fd);
      frame.fds.length = 0;
    }
    if (isReply) {
      // false: a late reply to a timed-out request
      if (!this.pending.settle(frame)) for (const fd of frame.fds.splice(0)) native.close(fd);
      return;
    }
    this.serveRequest(frame);
  }

  /** The server's DMA_READ / DMA_WRITE on socket-backed memory. */
  private serveRequest(frame: Frame): void {
    const h = frame.header;
    const noReply = (h.flags & HeaderFlags.NO_REPLY) !== 0;
    const answer = (parts: readonly Uint8Array[] | null, errno = 0): void => {
      if (noReply || this._closed) return;
      this.transport.send(errno !== 0 ? encodeErrorReply(h, errno) : encodeReply(h, parts ?? []));
    };
    try {
      if (h.command === Command.DMA_READ) {
        const r = decodeDmaReadRequest(frame.body);
        const count = Number(r.count);
        const { region, at } = this.lookup(r.address, r.count, "read");
        this.socketDma.reads++;
        this.socketDma.bytesRead += count;
        answer(encodeDmaReadReplyParts({ address: r.address, count: r.count, data: region.buffer!.subarray(at, at + count) }));
      } else if (h.command === Command.DMA_WRITE) {
        const w = decodeDmaWriteRequest(frame.body);
        const { region, at } = this.lookup(w.address, w.count, "write");
        region.buffer!.set(w.data, at);
        this.socketDma.writes++;
        this.socketDma.bytesWritten += w.data.length;
        // QEMU acknowledges a DMA_WRITE with an empty body
        answer([]);
      } else {
        answer(null, Errno.ENOTSUP);
      }
    } catch (err) {
      this.socketDma.refused++;
      answer(null, err instanceof VfioUserError ? err.errno : Errno.EINVAL);
    }
  }

  private lookup(address: bigint, count: bigint, access: "read" | "write"): { region: SocketRegion; at: number } {
    const end = address + count;
    const region = this.regions.find((r) => address >= r.iova && end <= r.iova + r.size);
    // QEMU answers an access that decodes to nothing with ENODEV
    if (!region || region.buffer === null) throw new VfioUserError(Errno.ENODEV, `no socket memory at 0x${address.toString(16)}+${count}`);
    if (access === "read" ? !region.readable : !region.writable) {
      throw new VfioUserError(Errno.EPERM, `socket memory at 0x${region.iova.toString(16)} is not ${access === "read" ? "readable" : "writable"}`);
    }
    return { region, at: Number(address - region.iova) };
  }

  private closedError(): ConnectionClosedError {
    if (this.closeReason) return new ConnectionClosedError(this.closeReason.message);
    return new ConnectionClosedError("the connection to the server is closed");
  }

  private onClose(err?: Error): void {
    if (this._closed) return;
    this._closed = true;
    if (err && !this.closeReason) this.closeReason = new ConnectionClosedError(`connection failed: ${err.message}`);
    for (const fd of this.decoder.close()) native.close(fd);
    this.pending.rejectAll(this.closedError());
    this.resolveClosed(this.closeReason);
  }
}

// -------------------------------------------------------------------------
// Eventfds, for interrupts
// -------------------------------------------------------------------------

/** A new non-blocking eventfd (close it with closeFd). */
export function createEventfd(): number {
  const fd = native.eventfd(0, 0);
  if (fd < 0) throw new Error(`eventfd failed: errno ${-fd}`);
  return fd;
}

export function closeFd(fd: number): void {
  if (fd >= 0) native.close(fd);
}

/** The eventfd's counter, reset to 0; 0n when nothing was signalled. */
export function readEventfd(fd: number): bigint {
  const b = Buffer.alloc(8);
  try {
    readSync(fd, b, 0, 8, null);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EAGAIN") return 0n;
    throw err;
  }
  return b.readBigUInt64LE(0);
}

/** Waits until the eventfd is signalled and returns its counter (reset); rejects after `timeoutMs`. */
export function waitEventfd(fd: number, timeoutMs = 5000): Promise<bigint> {
  const now = readEventfd(fd);
  if (now > 0n) return Promise.resolve(now);
  return new Promise<bigint>((resolve, reject) => {
    const watcher = new native.Watcher(fd, () => {
      const v = readEventfd(fd);
      if (v === 0n) return;
      clearTimeout(timer);
      watcher.close();
      resolve(v);
    });
    const timer = setTimeout(() => {
      watcher.close();
      reject(new RequestTimeoutError(`eventfd ${fd} not signalled within ${timeoutMs} ms`));
    }, timeoutMs);
    const r = watcher.start(native.READABLE);
    if (r < 0) {
      clearTimeout(timer);
      watcher.close();
      reject(new Error(`cannot poll eventfd ${fd}: errno ${-r}`));
    }
  });
}

/** Names a MigState for messages. */
export function stateName(state: number): string {
  return Object.entries(MigState).find(([, v]) => v === state)?.[0] ?? `state ${state}`;
}
