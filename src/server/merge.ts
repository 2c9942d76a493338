// MergeAndUnload: one merge at a time, written by the engine into a hidden folder under the
// export root and renamed into place only when complete; progress per tensor is streamed (only
// the latest while the client reads slowly); optionally unloads the adapter afterwards.

import * as fs from 'node:fs/promises';
import {
  MergeBase,
  MergeDtype,
  type MergeAndUnloadRequest,
  type MergeAndUnloadResponse,
} from '../gen/tuneserve/v1/adapters.js';
import { publishFolder } from '../engine/atomic-file.js';
import type { ServiceContext } from './context.js';
import type { MergeSpec } from './engine-port.js';
import { alreadyExists, invalidArgument, resourceExhausted, ServiceError } from './errors.js';
import { requireId } from './ids.js';
import { CoalescingWriter, type StreamWriter } from './streams.js';
import { requireManage, requireUse } from './auth.js';
import type { CallContext } from './rpc.js';
import { status } from '@grpc/grpc-js';

const dtypes: Partial<Record<MergeDtype, MergeSpec['dtype']>> = {
  [MergeDtype.MERGE_DTYPE_UNSPECIFIED]: 'bf16',
  [MergeDtype.MERGE_DTYPE_BF16]: 'bf16',
  [MergeDtype.MERGE_DTYPE_F16]: 'f16',
  [MergeDtype.MERGE_DTYPE_F32]: 'f32',
};

const bases: Partial<Record<MergeBase, MergeSpec['into']>> = {
  [MergeBase.MERGE_BASE_UNSPECIFIED]: 'original',
  [MergeBase.MERGE_BASE_ORIGINAL]: 'original',
  [MergeBase.MERGE_BASE_DEQUANTIZED]: 'dequantized',
};

/** Suggested wait before retrying while another merge runs: its remaining time by its pace. */
function remainingMs(context: ServiceContext): number {
  const current = context.merge.current;
  if (current === null || current.tensorsDone === 0) return 30_000;
  const elapsed = Date.now() - current.startedAt;
  const remaining = (elapsed / current.tensorsDone) * (current.tensorCount - current.tensorsDone);
  return Math.min(3_600_000, Math.max(1000, Math.round(remaining)));
}

/** Runs one MergeAndUnload call. */
export async function mergeAndUnload(
  request: MergeAndUnloadRequest,
  writer: StreamWriter<MergeAndUnloadResponse>,
  call: CallContext,
  context: ServiceContext,
): Promise<void> {
  const { adapters, dataRoot } = context;
  const { watch, log: logger } = call;

  // Validate.
  const adapterId = requireId(request.adapterId, 'adapter_id');
  const outputName = requireId(request.outputName, 'output_name');
  const dtype = dtypes[request.dtype];
  if (dtype === undefined) throw invalidArgument('dtype', `is not a known MergeDtype value (${request.dtype})`);
  const into = bases[request.base];
  if (into === undefined) throw invalidArgument('base', `is not a known MergeBase value (${request.base})`);
  call.annotate({ 'tuneserve.adapter': adapterId });
  const adapter = await adapters.get(adapterId);
  requireUse(call.principal, 'adapter', adapterId, adapter);
  if (request.unloadAdapter) requireManage(call.principal, 'adapter', adapterId, adapter);
  adapters.checkBase(adapter);
  const destination = dataRoot.exportEntry(outputName);
  if ((await dataRoot.realExisting(destination)) !== null) {
    throw alreadyExists('export', outputName, `an export folder named ${JSON.stringify(outputName)} already exists`);
  }
  if (context.merge.current !== null) {
    throw resourceExhausted('MERGE_IN_PROGRESS', 'another merge is running; merges run one at a time', remainingMs(context));
  }

  // Merge into a hidden folder, then publish it.
  const current = { outputName, startedAt: Date.now(), tensorsDone: 0, tensorCount: 0 };
  context.merge.current = current;
  const work = dataRoot.exportTempPath();
  try {
    const progress = new CoalescingWriter<MergeAndUnloadResponse>(writer, (_older, newer) => newer);
    const result = await context.engine().merge(
      { adapterDir: await adapters.verifiedFolder(adapterId), outDir: work, dtype, into },
      {
        signal: watch.signal,
        onProgress: ({ tensor, index, total }) => {
          current.tensorsDone = index;
          current.tensorCount = total;
          progress.push({ progress: { tensorName: tensor, tensorsDone: index, tensorCount: total } });
        },
      },
    );
    await progress.flush();
    watch.throwIfStopped();
    try {
      await publishFolder(work, destination);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'EEXIST') throw alreadyExists('export', outputName);
      throw error;
    }
    logger.info({ adapterId, outputName, bytes: result.bytes, dtype, into }, 'merge written');

    let unloaded = false;
    if (request.unloadAdapter) {
      try {
        await adapters.unload({ adapterId, version: null, alias: null });
        unloaded = true;
      } catch (error) {
        if (!(error instanceof ServiceError && error.code === status.FAILED_PRECONDITION)) throw error;
        logger.warn({ adapterId }, 'adapter left loaded after merge: in use');
      }
    }
    await writer.write({
      result: {
        outputName,
        sizeBytes: result.bytes,
        tensorCount: result.tensorCount,
        fidelity: {
          maxAbsLogitDiff: result.fidelity.maxAbsLogitDiff,
          meanAbsLogitDiff: result.fidelity.meanAbsLogitDiff,
          probeTokens: result.fidelity.probeTokens,
          top1Agreement: result.fidelity.top1Agreement,
        },
        adapterUnloaded: unloaded,
        elapsedSeconds: (Date.now() - current.startedAt) / 1000,
      },
    });
  } finally {
    context.merge.current = null;
    await fs.rm(work, { recursive: true, force: true });
  }
}
