/**
 * The public device API: what a device-model developer writes against.
 * A device is a small object: identity, regions (BARs) with read/write
 * handlers, capabilities, interrupts, and state save/load for migration.
 * Nothing here mentions sockets, messages or fds.
 *
 * Breaking this file's exported types is a semver-major change.
 */
import type { Logger } from "pino";
import type { OptionSchema } from "./options.ts";

/** PCI identity of the device (type-0 header fields). */
export interface DeviceIdentity {
  vendorId: number;
  deviceId: number;
  subsystemVendorId?: number;
  subsystemId?: number;
  /** 24 bits: base class << 16 | subclass << 8 | programming interface. */
  classCode: number;
  revision?: number;
}

/**
 * Access handlers of a region. Offsets are within the region, as Numbers:
 * exact because a BAR is at most 2^53 bytes (checked when the device is
 * attached).
 */
export interface RegionHandlers {
  /** Fill `data` with the bytes at `offset` (data.length is the access size). */
  read(offset: number, data: Buffer): void;
  /** Apply a guest write of `data` at `offset`. */
  write(offset: number, data: Buffer): void;
}

/**
 * A doorbell: a register whose writes only mean "look now" (virtio's queue
 * notify). A client that can (KVM) turns it into an ioeventfd through
 * GET_REGION_IO_FDS, and the guest's writes then ring it without a message;
 * every other write still reaches the BAR's `write` handler as usual, so a
 * device handles both.
 */
export interface Doorbell {
  /** Offset in the BAR. */
  readonly offset: number;
  /** Width of the guest's write. */
  readonly size: 1 | 2 | 4 | 8;
  /** Only writes of this value ring it (KVM's DATAMATCH); absent: any value does. */
  readonly datamatch?: bigint;
  /** Rung through the ioeventfd (one call may stand for several writes). */
  ring(): void;
}

/** One BAR of the device. */
export interface BarDefinition extends RegionHandlers {
  index: number;
  /**
   * Power of two; at least 16 for memory BARs, 4 for I/O; at most 2^53 (so
   * every offset handed to the handlers is an exact Number).
   */
  size: bigint;
  kind: "mem32" | "mem64" | "io";
  prefetchable?: boolean;
  /** Doorbells a client may serve as ioeventfds (see Doorbell). */
  doorbells?: readonly Doorbell[];
}

/** Capabilities the framework builds into config space, in this order. */
export interface CapabilitiesDefinition {
  /** PCI power management. */
  pm?: boolean;
  /** MSI with this many vectors (a power of two up to 32). */
  msi?: { vectors: 1 | 2 | 4 | 8 | 16 | 32; perVectorMask?: boolean };
  /**
   * MSI-X: the framework serves the table and PBA at these places inside
   * the named BARs; the device's own handlers never see those ranges.
   */
  msix?: { vectors: number; tableBar: number; tableOffset: number; pbaBar: number; pbaOffset: number };
  /** A PCI Express endpoint capability (config space grows to 4 KiB). */
  pcie?: boolean;
  /**
   * Vendor-specific capabilities (ID 0x09), in this order after the others:
   * the device lays out each body, the framework places it in the list.
   */
  vendor?: readonly VendorCapability[];
}

/**
 * A vendor-specific capability (PCI capability ID 0x09, e.g. virtio's
 * VIRTIO_PCI_CAP_* structures). The framework places it dword aligned in
 * the capability list and owns byte 1 (the next pointer); everything else
 * is the device's. Offsets below are within the capability (0 = its ID).
 */
export interface VendorCapability {
  /**
   * Contents at power-on: byte 0 is the ID (0x09), byte 1 is filled in by
   * the framework, byte 2 is by convention the capability's length. 3 to
   * 192 bytes.
   */
  readonly bytes: Uint8Array;
  /**
   * Bits the guest may write, byte for byte (same length as `bytes`).
   * Without it the capability is read-only to the guest.
   */
  readonly writable?: Uint8Array;
  /**
   * Live reads: called for a guest read that touches the capability, with
   * `data` holding the stored bytes of the part read (from `offset`); the
   * device may overwrite them. `cap` is the capability as stored (read only).
   */
  read?(offset: number, data: Buffer, cap: Buffer): void;
  /**
   * Called after a guest write touched the capability (masks applied):
   * `offset` and `length` say which part, `cap` is the capability as stored
   * now (read only).
   */
  write?(offset: number, length: number, cap: Buffer): void;
}

/** Which interrupt mechanism the guest driver enabled. */
export type InterruptMode = "none" | "intx" | "msi" | "msix";

/** Interrupts as the device sees them, whatever the transport does. */
export interface Interrupts {
  /** The mechanism the guest enabled in config space. */
  readonly mode: InterruptMode;
  /**
   * Level of the INTx line (INTA# etc.). The framework reflects it in the
   * status register and delivers it when INTx is the active mode and the
   * command register allows it; a level still high after the guest's
   * unmask fires again.
   */
  setLevel(asserted: boolean): void;
  /**
   * Send message-signalled interrupt `vector` (MSI or MSI-X, whichever is
   * enabled). True when the message went to the client. False when neither
   * is enabled, the vector is out of range, the device is not running, or
   * the client's eventfd could not take it (counted and logged). MSI-X: a
   * vector the client has masked (it gave the vector no eventfd, as QEMU
   * does for masked and unused vectors) gets its pending bit set in the
   * PBA and returns false; the message goes out when the client unmasks it
   * (assigns an eventfd). Vectors masked in the client's own emulated table
   * (QEMU's) are held pending by the client.
   */
  notify(vector?: number): boolean;
}

/** One guest range of a scatter-gather list. */
export interface DmaSegment {
  readonly address: bigint;
  /** Bytes; 0 is allowed and moves nothing. */
  readonly length: number;
}

/**
 * Zero-copy views of guest memory from `Dma.map`, valid until `release()`.
 * While any are held, the client's DMA_UNMAP of that memory waits (the
 * server replies once the views are released), so release them promptly:
 * when the I/O they were taken for is done.
 */
export interface DmaViews {
  /**
   * The segments' bytes in order. A segment gives more than one Buffer where
   * the client's DMA regions (or the server's 1 GiB mapping windows) split
   * it; zero-length segments give none.
   */
  readonly buffers: readonly Buffer[];
  /** Total bytes of `buffers`. */
  readonly length: number;
  /**
   * Done with the views: do not touch them afterwards. Views taken for
   * "write" are logged dirty again here (a write into a view after a dirty
   * report is not lost). Idempotent.
   */
  release(): void;
}

/**
 * Device-initiated DMA into client (guest) memory. Both paths (memory the
 * client shared with an fd, and DMA_READ/WRITE messages) look the same here.
 * A range may span several of the client's DMA regions (QEMU maps one per
 * memory section): it is split per region, each part through its own path.
 * Every write is logged for migration when dirty logging is on. Rejected
 * with EPERM when bus mastering is off in the command register or the
 * device is stopped, or when a region does not allow the access; with
 * EFAULT when any byte of the range is not mapped (checked before anything
 * moves, so a refused write writes nothing).
 */
export interface Dma {
  read(address: bigint, length: number): Promise<Buffer>;
  write(address: bigint, data: Uint8Array): Promise<void>;
  /** Scatter-gather read: the segments' bytes, concatenated. */
  readv(segments: readonly DmaSegment[]): Promise<Buffer>;
  /** Scatter-gather write: `data` laid over the segments in order (EINVAL unless its length is their total). */
  writev(segments: readonly DmaSegment[], data: Uint8Array): Promise<void>;
  /**
   * Zero-copy views of the segments, or null when some part is not memory
   * the client shared with an fd (then use readv / writev, which copy over
   * DMA_READ / DMA_WRITE messages). Throws like `read`/`write` otherwise.
   *
   * `access` "write" counts as written: the ranges are logged dirty when
   * mapped and again at release. Views taken for "read" must never be
   * written (the client may have mapped that memory read-only, and a store
   * to it kills the process).
   */
  map(segments: readonly DmaSegment[], access: "read" | "write"): DmaViews | null;
}

/** What the framework hands a device when it is attached to a server. */
export interface DeviceContext {
  readonly irq: Interrupts;
  readonly dma: Dma;
  /** Read-only view of the device's config space. */
  readonly config: {
    read(offset: number, length: number): Buffer;
    readonly busMaster: boolean;
    readonly memoryEnabled: boolean;
  };
  readonly log: Logger;
  /**
   * True while the device may run (DMA, interrupts, timers): false in the
   * migration states STOP, STOP_COPY, RESUMING and while resetting.
   */
  readonly running: boolean;
}

/**
 * Large device memory migrated during pre-copy: the device tracks which of
 * its own pages changed; the framework sends all pages once, then only dirty
 * ones, and the rest in stop-copy.
 */
export interface PrecopyMemory {
  /** Device memory size in bytes. */
  readonly size: bigint;
  /** Tracking granularity in bytes (a power of two). */
  readonly pageSize: number;
  /** Start tracking writes; every page counts as dirty from here. */
  startTracking(): void;
  stopTracking(): void;
  /**
   * Page numbers written since the last call. Each page is cleared as it is
   * handed out, so a page written after that is reported again next time.
   * The framework reads the whole iterable at once. A Uint32Array of the
   * pages, ascending, is the cheap form: the framework queues it as it is
   * (no per-page step), which keeps a stop-copy transition of a large
   * device short; the array must be fresh (not changed afterwards).
   */
  takeDirtyPages(): Iterable<number>;
  /** Count of pages dirty now, for size estimates. */
  dirtyPageCount(): number;
  /** Read/write raw device memory for the stream. */
  readPage(page: number): Uint8Array;
  /**
   * Copy `data` (one page) into device memory. `data` is valid only during
   * the call: it is a view of the received message, whose buffer takes the
   * next one, so keep a copy, never the view.
   */
  writePage(page: number, data: Uint8Array): void;
  /**
   * Optional: pages `first` .. `first + count - 1` as one contiguous view of
   * device memory (not a copy) of `count * pageSize` bytes; throws
   * RangeError outside device memory. Without it the framework copies a
   * record page by page with `readPage`.
   *
   * With it, MIG_DATA_READ sends device memory without copying it: a MEMORY
   * record's CRC is taken over the view and the bytes go out in the same
   * synchronous step of one MIG_DATA_READ (what stays queued for the next
   * read, under a page, is copied before the handler returns), so no view
   * is kept across turns of the event loop and this is safe while the
   * device runs. A device that offers `readPages` must therefore not let
   * anything outside the JavaScript thread (another thread or process
   * sharing the memory) write it. As for every `PrecopyMemory`, every change
   * while tracking must be marked dirty (BAR handlers, the device's own
   * DMA, reset) so the page is sent again.
   */
  readPages?(first: number, count: number): Uint8Array;
  /**
   * Optional: copy `data` (a whole number of pages) into pages `first` ..
   * onward in one step; throws RangeError outside device memory. Without it
   * the framework calls `writePage` per page. Like `writePage`, `data` is
   * valid only during the call.
   */
  writePages?(first: number, data: Uint8Array): void;
}

/** Structured state: anything msgpack can carry (objects, numbers, bigints, Uint8Array). */
export type StateValue = unknown;

/** A device model. */
export interface Device {
  /** Short type name, checked on migration (a stream for another type is refused). */
  readonly type: string;
  /** Version of this device's state layout; a stream with another version is refused. */
  readonly stateVersion: number;
  readonly identity: DeviceIdentity;
  readonly bars: readonly BarDefinition[];
  /** INTx pin: 1 = INTA ... 4 = INTD; 0 or absent for none. */
  readonly interruptPin?: number;
  readonly capabilities?: CapabilitiesDefinition;
  /** Called once, before any access. */
  attach(ctx: DeviceContext): void;
  /** Back to power-on state (config space is reset by the framework). */
  reset(): void;
  /**
   * Called when `ctx.running` changes; a stopping device must stop DMA and
   * interrupts. The INTx level is device state: after `loadState`, a device
   * whose state implies an asserted line calls `irq.setLevel(true)` here.
   */
  runStateChanged?(running: boolean): void;
  /**
   * Called before a running device is stopped for migration (the arcs from
   * RUNNING or PRE_COPY to STOP or STOP_COPY), while `ctx.running` is still
   * true: stop taking new work, and resolve once every request in flight has
   * completed (its DMA done, its interrupt sent) or is recorded in what
   * `saveState` will return. The state machine waits for it; nothing the
   * device started may DMA or interrupt after it resolves. A device with
   * storage behind it flushes here. Work the guest queued meanwhile stays
   * queued for the destination (or for `runStateChanged(true)` if the
   * migration is cancelled). A rejection fails the arc (ERROR).
   */
  quiesce?(): Promise<void>;
  /** Small device state (registers) for migration and snapshots. */
  saveState(): StateValue;
  /** Load what saveState returned (already checked for type and version). */
  loadState(state: StateValue): void;
  /** Large memory migrated with pre-copy, if any. */
  readonly precopyMemory?: PrecopyMemory;
  /**
   * Called once when the framework lets the device go (the server that
   * attached it is closed, the compliance bench is done with it): stop
   * timers, close files, so the process can exit. No access follows.
   */
  dispose?(): void | Promise<void>;
}

/** Options given on the command line as `--opt key=value`. */
export type DeviceOptions = Readonly<Record<string, string>>;

/** A factory registered under a name (`--device NAME`). */
export interface DeviceFactory {
  readonly name: string;
  readonly description: string;
  /**
   * The `--opt` keys `create` takes, with types, ranges and defaults
   * (`defineOptions`); `vfio-user-ts devices` lists them. `create` checks
   * its options against the same schema with `parseOptions`.
   */
  readonly options?: OptionSchema;
  create(options: DeviceOptions): Device;
}
