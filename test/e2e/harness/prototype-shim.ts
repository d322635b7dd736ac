/**
 * Test-only: a DEVICE_FEATURE handler that lets QEMU's migration prototype
 * *as found* get past its DMA logging bugs, so that one migration shows all
 * of its deviations and not only the first.
 *
 * The prototype forwards linux/vfio.h's structs as the ioctl lays them out:
 * DMA_LOGGING_START with a ranges pointer where the spec puts the ranges,
 * DMA_LOGGING_REPORT as the ioctl's 32-byte struct followed by a
 * bitmap-sized buffer, expecting the bitmap back at offset 32 of the data.
 * The server refuses both (EINVAL), and QEMU then fails the migration at its
 * setup, before it sends anything else. This shim first lets the real
 * handler judge the message (so the refusal is what the server does, and it
 * goes into the conformance report exactly as the connection would record
 * it), then serves it the way the prototype meant it: START as "log every
 * mapped region" (no ranges), REPORT over the request's iova, length and
 * page_size, answered in the prototype's layout.
 *
 * Nothing of this is in the server: the server refuses these messages.
 */
import { Command, Feature, FeatureFlags } from "../../../protocol/constants.ts";
import { dmaLoggingControlLayout, dmaLoggingReportLayout } from "../../../protocol/messages/device-feature-data.ts";
import type { Handler, Reply, Request } from "../../../src/server/dispatcher.ts";
import { handleDeviceFeature } from "../../../src/server/handlers/feature.ts";

/** How often the shim served what the server refused. */
export interface ShimCounts {
  start: number;
  report: number;
}

async function judged(req: Request): Promise<void> {
  try {
    await handleDeviceFeature(req);
  } catch (err) {
    req.session.conformance?.refused(req.header, err);
    return;
  }
  throw new Error("prototype shim: the server accepted a message it is expected to refuse");
}

export function prototypeLoggingShim(counts: ShimCounts = { start: 0, report: 0 }): [number, Handler] {
  const handler: Handler = async (req: Request): Promise<Reply> => {
    const body = req.body;
    if (body.length < 8) return handleDeviceFeature(req);
    const flags = body.readUInt32LE(4);
    const feature = flags & FeatureFlags.MASK;
    const data = body.subarray(8);
    if (feature === Feature.DMA_LOGGING_START && (flags & FeatureFlags.SET) !== 0 && dmaLoggingControlLayout(data) === "kernel") {
      await judged(req);
      counts.start++;
      const spec = Buffer.alloc(8 + 16);
      spec.writeUInt32LE(spec.length, 0);
      spec.writeUInt32LE(flags, 4);
      data.copy(spec, 8, 0, 8); // page_size; num_ranges 0: every mapped region
      return handleDeviceFeature({ ...req, body: spec });
    }
    if (feature === Feature.DMA_LOGGING_REPORT && (flags & FeatureFlags.GET) !== 0 && dmaLoggingReportLayout(data) === "kernel") {
      await judged(req);
      counts.report++;
      const spec = Buffer.alloc(8 + 24);
      spec.writeUInt32LE(body.readUInt32LE(0), 0);
      spec.writeUInt32LE(flags, 4);
      data.copy(spec, 8, 0, 24);
      const r = await handleDeviceFeature({ ...req, body: spec });
      // [argsz, flags] [iova, length, page_size] [bitmap] -> the prototype's: the 32-byte struct, then the bitmap
      const [, fields, bitmap] = r.parts;
      const fixed = Buffer.alloc(8);
      fixed.writeUInt32LE(8 + 32 + (bitmap?.length ?? 0), 0);
      fixed.writeUInt32LE(flags, 4);
      return { parts: [fixed, fields!, Buffer.alloc(8), ...(bitmap ? [bitmap] : [])] };
    }
    return handleDeviceFeature(req);
  };
  return [Command.DEVICE_FEATURE, handler];
}
