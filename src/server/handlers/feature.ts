/**
 * DEVICE_FEATURE (spec: "VFIO_USER_DEVICE_FEATURE"): migration and DMA
 * logging, with the VFIO rules for GET / SET / PROBE. PROBE answers without
 * side effects; a GET reply carries the data and grows argsz by its length.
 */
import { Feature, FeatureFlags, MigState, NO_DATA_FD } from "../../../protocol/constants.ts";
import { VfioUserError, fail } from "../../../protocol/errors.ts";
import { decodeDeviceFeatureRequest, encodeDeviceFeatureParts } from "../../../protocol/messages/device-feature.ts";
import {
  decodeDmaLoggingControl,
  decodeDmaLoggingReportRequest,
  decodeFeatureMigState,
  dmaLoggingControlLayout,
  dmaLoggingReportLayout,
  encodeDmaLoggingControl,
  encodeFeatureMigDataSize,
  encodeFeatureMigState,
  encodeFeatureMigration,
} from "../../../protocol/messages/device-feature-data.ts";
import { DirtyLog, isPowerOfTwo } from "../../dma/dirty-bitmap.ts";
import type { Reply, Request } from "../dispatcher.ts";

const FIXED = 8;

/** Which operations each feature supports. */
const OPS: ReadonlyMap<number, number> = new Map([
  [Feature.MIGRATION, FeatureFlags.GET],
  [Feature.MIG_DEVICE_STATE, FeatureFlags.GET | FeatureFlags.SET],
  [Feature.DMA_LOGGING_START, FeatureFlags.SET],
  [Feature.DMA_LOGGING_STOP, FeatureFlags.SET],
  [Feature.DMA_LOGGING_REPORT, FeatureFlags.GET],
  [Feature.MIG_DATA_SIZE, FeatureFlags.GET],
]);

/** Smallest and largest dirty-tracking page sizes offered. */
const MIN_LOG_PAGE = 4096n;
const MAX_LOG_PAGE = 1n << 30n;

/** Features whose GET takes no input: a GET request's data is nothing but room for the reply. */
const GET_WITHOUT_INPUT: ReadonlySet<number> = new Set([Feature.MIGRATION, Feature.MIG_DEVICE_STATE, Feature.MIG_DATA_SIZE]);

/**
 * Runs a decode or action on the feature data; a refusal's fact offset is
 * data-relative there and becomes body-relative (data starts at offset 8).
 */
async function onData<T>(fn: () => T | Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof VfioUserError && err.fact) err.fact = { rule: err.fact.rule, offset: FIXED + (err.fact.offset ?? 0) };
    throw err;
  }
}

function countBits(bitmap: Uint8Array): number {
  let n = 0;
  for (let i = 0; i < bitmap.length; i++) {
    let b = bitmap[i]!;
    while (b !== 0) {
      b &= b - 1;
      n++;
    }
  }
  return n;
}

export async function handleDeviceFeature(req: Request): Promise<Reply> {
  const f = decodeDeviceFeatureRequest(req.body);
  const feature = f.flags & FeatureFlags.MASK;
  const ops = f.flags & (FeatureFlags.GET | FeatureFlags.SET);
  const supported = OPS.get(feature);
  if (supported === undefined) throw fail.notsup(`device feature ${feature} is not supported`);
  // kernel (vfio_check_feature): PROBE alone asks whether the feature exists (QEMU probes DMA_LOGGING_START so)
  if (ops === 0 && (f.flags & FeatureFlags.PROBE) === 0) throw fail.inval("DEVICE_FEATURE without GET or SET");
  if ((ops & ~supported) !== 0) throw fail.inval(`device feature ${feature} does not support ${ops & FeatureFlags.SET ? "SET" : "GET"}`);
  // spec: the reply to SET or PROBE is the request payload, and argsz is the
  // most the client takes back: a SET whose payload does not fit is refused
  // before it changes anything (libvfio-user; the kernel's vfio_check_feature
  // refuses an argsz short of the feature's struct)
  if ((ops & FeatureFlags.SET) !== 0 && f.argsz < FIXED + f.data.length) {
    throw fail.inval(`DEVICE_FEATURE SET argsz ${f.argsz} is smaller than its ${FIXED + f.data.length}-byte payload`);
  }
  const echo = (): Reply => ({ parts: encodeDeviceFeatureParts({ argsz: FIXED + f.data.length, flags: f.flags, data: f.data }) });
  const conf = req.session.conformance;
  if (conf !== null && f.data.length > 0 && ((f.flags & FeatureFlags.PROBE) !== 0 || (ops === FeatureFlags.GET && GET_WITHOUT_INPUT.has(feature)))) {
    const op = (f.flags & FeatureFlags.PROBE) !== 0 ? "PROBE" : "GET";
    conf.note("feature-get-data", req.header, FIXED, `${op} of feature ${feature} with ${f.data.length} bytes of data (ignored)`);
  }
  if (f.flags & FeatureFlags.PROBE) return echo();

  const ep = req.endpoint;
  const get = (data: Uint8Array): Reply => {
    // spec: GET adds the data and its length to argsz; a reply the client has no room for carries only argsz
    const argsz = FIXED + data.length;
    if (argsz > f.argsz) return { parts: encodeDeviceFeatureParts({ argsz, flags: f.flags, data: new Uint8Array(0) }) };
    return { parts: encodeDeviceFeatureParts({ argsz, flags: f.flags, data }) };
  };

  switch (feature) {
    case Feature.MIGRATION:
      return get(encodeFeatureMigration({ flags: ep.migration.flags }));

    case Feature.MIG_DEVICE_STATE: {
      if (ops === FeatureFlags.GET) return get(encodeFeatureMigState({ device_state: ep.migration.state, data_fd: NO_DATA_FD }));
      const m = await onData(() => decodeFeatureMigState(f.data));
      // spec: "ERROR cannot be specified as a device state"
      if (m.device_state === MigState.ERROR) throw fail.inval("ERROR cannot be requested").with({ rule: "mig-state-arc", offset: FIXED });
      await onData(() => ep.migration.setState(m.device_state as MigState));
      // the reply carries the new state; data_fd is -1, never an echo (data moves with MIG_DATA_READ/WRITE)
      const data = encodeFeatureMigState({ device_state: ep.migration.state, data_fd: NO_DATA_FD });
      return { parts: encodeDeviceFeatureParts({ argsz: FIXED + data.length, flags: f.flags, data }) };
    }

    case Feature.DMA_LOGGING_START: {
      const c = await onData(() => decodeLoggingControl(f.data));
      if (ep.dirtyLog) throw fail.busy("DMA logging is already started");
      // spec: the page size is a hint; a power of two in range is honoured. None
      // (0) or one the device cannot do gets the negotiated migration pgsize.
      let pageSize = c.page_size;
      if (!isPowerOfTwo(pageSize) || pageSize < MIN_LOG_PAGE) pageSize = req.session.migrationPgsize;
      if (pageSize < MIN_LOG_PAGE) pageSize = MIN_LOG_PAGE;
      if (pageSize > MAX_LOG_PAGE) pageSize = MAX_LOG_PAGE;
      // spec (vfio.h): no ranges means every mapped region
      const ranges = c.ranges.length > 0 ? c.ranges : ep.dmaTable.regions().map((r) => ({ iova: r.iova, length: r.size }));
      if (ranges.length === 0) throw fail.inval("DMA logging of all memory, but nothing is mapped");
      for (const r of ranges) {
        if (r.length === 0n || r.iova % pageSize !== 0n || r.length % pageSize !== 0n) {
          throw fail.inval(`logging range 0x${r.iova.toString(16)}+0x${r.length.toString(16)} is not aligned to page size ${pageSize}`);
        }
      }
      ep.startDirtyLog(new DirtyLog(ranges, pageSize));
      req.log.info({ ranges: ranges.length, pageSize }, "DMA logging started");
      const data = encodeDmaLoggingControl({ page_size: pageSize, ranges: c.ranges });
      return { parts: encodeDeviceFeatureParts({ argsz: FIXED + data.length, flags: f.flags, data }) };
    }

    case Feature.DMA_LOGGING_STOP:
      if (ep.dirtyLog) req.log.info("DMA logging stopped");
      ep.stopDirtyLog();
      return echo();

    case Feature.DMA_LOGGING_REPORT: {
      const r = await onData(() => decodeLoggingReport(f.data));
      const log = ep.dirtyLog;
      if (!log) throw fail.inval("DMA logging is not started");
      // kernel rule: a report page is a power of two of at least 4 KiB
      if (!isPowerOfTwo(r.page_size) || r.page_size < MIN_LOG_PAGE) throw fail.inval(`report page size ${r.page_size} is not a power of two >= 4096`);
      const bitmapBytes = ((r.length / r.page_size + 63n) / 64n) * 8n;
      const argsz = BigInt(FIXED + f.data.length) + bitmapBytes;
      // the reply may exceed max_data_xfer_size (that bounds data transfer
      // messages); it is bounded by the negotiated max_bitmap_size and argsz
      if (bitmapBytes > BigInt(req.session.maxBitmapSize)) {
        throw fail.toobig(`a ${bitmapBytes}-byte bitmap exceeds the negotiated max_bitmap_size ${req.session.maxBitmapSize}`);
      }
      if (argsz > BigInt(f.argsz)) {
        // spec: no room: report the size needed, change nothing (the log is not cleared)
        return { parts: encodeDeviceFeatureParts({ argsz: Number(argsz), flags: f.flags, data: f.data }) };
      }
      const bitmap = log.report(r.iova, r.length, r.page_size);
      if (req.log.isLevelEnabled("debug")) req.log.debug({ iova: r.iova, length: r.length, pageSize: r.page_size, dirty: countBits(bitmap) }, "DMA logging report");
      return { parts: [...encodeDeviceFeatureParts({ argsz: Number(argsz), flags: f.flags, data: f.data }), bitmap] };
    }

    case Feature.MIG_DATA_SIZE:
      return get(encodeFeatureMigDataSize({ stop_copy_length: ep.faults === null ? ep.migration.stopCopySize() : ep.faults.stopCopySize(req.header, ep.migration.stopCopySize()) }));
  }
  throw fail.notsup(`device feature ${feature} is not supported`);
}

/** START/STOP data; the ioctl's layout (ranges behind a pointer at offset 16) is named as such. */
function decodeLoggingControl(data: Uint8Array) {
  if (dmaLoggingControlLayout(data) === "kernel") {
    throw fail
      .inval(`DMA_LOGGING control: ${data.length} bytes with num_ranges ${Buffer.from(data).readUInt32LE(8)}: linux/vfio.h's layout, a ranges pointer at offset 16 instead of the ranges`)
      .with({ rule: "dma-logging-ranges-not-inline", offset: 16 });
  }
  return decodeDmaLoggingControl(data);
}

/** REPORT request data: 24 bytes; anything else (the ioctl's 32-byte struct with its bitmap pointer, say) is named as such. */
function decodeLoggingReport(data: Uint8Array) {
  const layout = dmaLoggingReportLayout(data);
  if (layout !== "spec") {
    const what = layout === "kernel" ? "linux/vfio.h's 32-byte struct (bitmap pointer at offset 24)" + (data.length > 32 ? ` followed by ${data.length - 32} bytes of bitmap buffer` : "") : "not the 24 bytes of iova, length, page_size";
    throw fail.inval(`DMA_LOGGING_REPORT request data is ${data.length} bytes: ${what}`).with({ rule: "dma-logging-report-size", offset: Math.min(data.length, 24) });
  }
  return decodeDmaLoggingReportRequest(data);
}
