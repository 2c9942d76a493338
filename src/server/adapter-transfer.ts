// Moving PEFT adapter folders in and out as file streams. Import: a manifest header (names from a
// fixed set, sizes within limits, SHA-256 each), then chunks; every file is checked, the folder is
// checked against the base by the engine, and only then published. Export: a header with the
// stored manifest, then each file's bytes in chunks, written with backpressure.

import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import type { ExportAdapterRequest, ExportAdapterResponse, ImportAdapterRequest } from '../gen/tuneserve/v1/adapters.js';
import type { FileEntry } from '../gen/tuneserve/v1/common.js';
import {
  ADAPTER_CONFIG_FILE,
  ADAPTER_README_FILE,
  ADAPTER_WEIGHTS_FILE,
  type AdapterFileEntry,
  type AdapterView,
} from './adapter-registry.js';
import { MAX_CHUNK_BYTES, type ServiceContext } from './context.js';
import { canManage, otherTenant } from './auth.js';
import { invalidArgument, isEngineError } from './errors.js';
import { requireId, type AdapterRef } from './ids.js';
import { IncomingFile, isSha256Hex } from './incoming-file.js';
import type { CallContext } from './rpc.js';
import type { StreamWriter } from './streams.js';
import { toAdapter } from './wire.js';

const SMALL_FILE_LIMIT = 1024 * 1024;
const DEFAULT_EXPORT_CHUNK = 1024 * 1024;

/** Checks an import manifest; INVALID_ARGUMENT naming the offending header.files entry. */
function checkManifest(files: FileEntry[], maxAdapterBytes: number): AdapterFileEntry[] {
  const limits: Record<string, number> = {
    [ADAPTER_CONFIG_FILE]: SMALL_FILE_LIMIT,
    [ADAPTER_WEIGHTS_FILE]: maxAdapterBytes,
    [ADAPTER_README_FILE]: SMALL_FILE_LIMIT,
  };
  const seen = new Set<string>();
  files.forEach((file, index) => {
    const field = `header.files[${index}]`;
    const limit = limits[file.name];
    if (limit === undefined) {
      throw invalidArgument(`${field}.name`, `${JSON.stringify(file.name)} is not one of ${Object.keys(limits).join(', ')}`);
    }
    if (seen.has(file.name)) throw invalidArgument(`${field}.name`, `repeats ${file.name}`);
    seen.add(file.name);
    if (file.sizeBytes < 1 || file.sizeBytes > limit) {
      throw invalidArgument(`${field}.size_bytes`, `must be 1 to ${limit} bytes for ${file.name}`, file.name === ADAPTER_WEIGHTS_FILE ? 'ADAPTER_TOO_LARGE' : 'INVALID_ARGUMENT');
    }
    if (!isSha256Hex(file.sha256)) throw invalidArgument(`${field}.sha256`, 'must be 64 lowercase hexadecimal characters');
  });
  for (const required of [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]) {
    if (!seen.has(required)) throw invalidArgument('header.files', `must include ${required}`);
  }
  return files.map((f) => ({ name: f.name, sizeBytes: f.sizeBytes, sha256: f.sha256 }));
}

/** Receives an ImportAdapter stream and publishes the adapter; returns it. */
export async function importAdapter(
  messages: AsyncGenerator<ImportAdapterRequest>,
  context: ServiceContext,
  call: CallContext,
): Promise<AdapterView> {
  const { adapters, dataRoot, limits } = context;
  const first = await messages.next();
  const header = first.done ? undefined : first.value.header;
  if (header === undefined) throw invalidArgument('header', 'must be the first message of the stream');
  const adapterId = requireId(header.adapterId, 'header.adapter_id');
  call.annotate({ 'tuneserve.adapter': adapterId });
  const manifest = checkManifest(header.files, limits.maxAdapterBytes);

  // A new version of an existing adapter: only its own tenant (or an admin) may add one.
  const newVersion = header.newVersion && (await adapters.exists(adapterId));
  if (newVersion) {
    const line = await adapters.get(adapterId);
    if (!canManage(call.principal, line)) throw otherTenant('adapter', adapterId);
  } else {
    await adapters.reserve(adapterId);
  }
  const folder = await dataRoot.tempFolder('import');
  const incoming = new Map<string, IncomingFile>();
  try {
    for (const [index, file] of manifest.entries()) {
      incoming.set(
        file.name,
        await IncomingFile.create(dataRoot.file(folder, file.name), {
          sizeBytes: file.sizeBytes,
          sha256: file.sha256,
          dataField: 'chunk.data',
          sizeField: `header.files[${index}].size_bytes`,
          shaField: `header.files[${index}].sha256`,
        }),
      );
    }
    for await (const message of messages) {
      if (message.header !== undefined) throw invalidArgument('header', 'must be sent once, in the first message only');
      const chunk = message.chunk;
      if (chunk === undefined) throw invalidArgument('part', 'must be set (header or chunk)');
      const target = incoming.get(chunk.name);
      if (target === undefined) throw invalidArgument('chunk.name', `${JSON.stringify(chunk.name)} is not in the header's manifest`);
      if (chunk.data.length > MAX_CHUNK_BYTES) throw invalidArgument('chunk.data', `must be at most ${MAX_CHUNK_BYTES} bytes`);
      await target.write(chunk.data);
    }
    for (const file of incoming.values()) await file.finish();

    const engine = context.engine();
    let config;
    try {
      config = await engine.inspectAdapter(folder);
    } catch (error) {
      if (isEngineError(error) && error.code === 'ADAPTER_INVALID') {
        throw invalidArgument('header.files', `do not form a PEFT LoRA adapter: ${dataRoot.redact(error.message)}`, 'ADAPTER_INVALID');
      }
      throw error;
    }
    await adapters.publish(
      folder,
      {
        adapterId,
        source: 'imported',
        jobId: null,
        createTime: Date.now(),
        baseFingerprint: engine.modelInfo().fingerprint,
        config,
        metrics: null,
        tenant: call.principal.tenant,
        shared: header.shared,
      },
      manifest,
      { newVersion: header.newVersion },
    );
  } finally {
    if (!newVersion) adapters.unreserve(adapterId);
    for (const file of incoming.values()) await file.discard().catch(() => {});
    await fs.rm(folder, { recursive: true, force: true });
  }
  return adapters.get(adapterId);
}

/** Streams the header and files of the adapter version a reference names (ExportAdapter). */
export async function exportAdapter(
  request: ExportAdapterRequest,
  ref: AdapterRef,
  writer: StreamWriter<ExportAdapterResponse>,
  context: ServiceContext,
): Promise<void> {
  const chunkSize = request.chunkSize === 0 ? DEFAULT_EXPORT_CHUNK : request.chunkSize;
  if (chunkSize > MAX_CHUNK_BYTES) throw invalidArgument('chunk_size', `must be at most ${MAX_CHUNK_BYTES} bytes`);
  const version = await context.adapters.resolve(ref);
  const view = { ...(await context.adapters.get(ref.adapterId)) };
  // The header describes the version exported (its config, files and metrics).
  Object.assign(view, {
    version: version.version, contentHash: version.contentHash, config: version.config, files: version.files,
    metrics: version.metrics, source: version.source, jobId: version.jobId, createTime: version.createTime,
    sizeBytes: version.files.reduce((sum, f) => sum + f.sizeBytes, 0),
  });
  // A file changed on disk would reach the client under a manifest it no longer matches.
  const folder = (await context.adapters.verify(version)).folder;
  // Open every file before the header goes out, so a concurrent delete cannot cut the stream short.
  const handles = await Promise.all(view.files.map((file) => fs.open(context.dataRoot.file(folder, file.name), 'r')));
  try {
    await writer.write({
      header: {
        adapter: toAdapter(view, context.engine().modelInfo().fingerprint),
        files: view.files.map((f) => ({ name: f.name, sizeBytes: f.sizeBytes, sha256: f.sha256 })),
      },
    });
    for (const [index, file] of view.files.entries()) {
      const handle = handles[index];
      if (handle === undefined) continue;
      for (let offset = 0; offset < file.sizeBytes; ) {
        const buffer = Buffer.allocUnsafe(Math.min(chunkSize, file.sizeBytes - offset));
        const { bytesRead } = await handle.read(buffer, 0, buffer.length, offset);
        if (bytesRead === 0) throw new Error(`${path.basename(file.name)} is shorter than its manifest says`);
        offset += bytesRead;
        await writer.write({ chunk: { name: file.name, data: buffer.subarray(0, bytesRead) } });
      }
    }
  } finally {
    await Promise.all(handles.map((handle) => handle.close()));
  }
}
