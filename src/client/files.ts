// Moving files to and from a server with the client-streaming and server-streaming RPCs: a
// dataset upload from a JSONL file, an adapter folder imported or exported. Sizes and SHA-256 go up
// front, chunks of 1 MiB follow with backpressure, and an upload the server refuses mid-stream fails
// at once instead of waiting for 'drain'. Each takes either the typed client or the generated clients.

import type { ClientWritableStream } from '@grpc/grpc-js';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import type { Adapter, ExportAdapterResponse } from '../gen/tuneserve/v1/adapters.js';
import type { FileEntry } from '../gen/tuneserve/v1/common.js';
import type { Dataset } from '../gen/tuneserve/v1/datasets.js';
import type { TuneClient, TuneClients } from './connection.js';

const CHUNK_BYTES = 1024 * 1024;

/** The generated clients of either kind of client. */
const generated = (clients: TuneClient | TuneClients): TuneClients => ('raw' in clients ? clients.raw : clients);

/** SHA-256 (hex) and size of a file. */
export async function describeFile(file: string): Promise<{ sizeBytes: number; sha256: string }> {
  const hash = createHash('sha256');
  let sizeBytes = 0;
  for await (const chunk of createReadStream(file)) {
    hash.update(chunk as Buffer);
    sizeBytes += (chunk as Buffer).length;
  }
  return { sizeBytes, sha256: hash.digest('hex') };
}

/** A promise with its settle functions, for callback-style calls. */
function deferred<T>(): { promise: Promise<T>; resolve(value: T): void; reject(error: unknown): void } {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((ok, fail) => {
    resolve = ok;
    reject = fail;
  });
  promise.catch(() => {});
  return { promise, resolve, reject };
}

/**
 * Writes to a client stream, waiting for 'drain' when it is full; rejects as soon as the call
 * itself fails (the server refused the upload), since 'drain' would never come.
 */
async function send<T>(stream: ClientWritableStream<T>, message: T, call: Promise<unknown>): Promise<void> {
  if (stream.write(message)) return;
  await Promise.race([new Promise<void>((resolve) => stream.once('drain', () => resolve())), call]);
}

/** Uploads a JSONL file as a dataset. */
export async function uploadDatasetFile(client: TuneClient | TuneClients, datasetId: string, file: string, options: { shared?: boolean } = {}): Promise<Dataset> {
  const clients = generated(client);
  const { sizeBytes, sha256 } = await describeFile(file);
  const reply = deferred<Dataset>();
  const stream = clients.datasets.uploadDataset((error, response) =>
    error ? reply.reject(error) : reply.resolve(response.dataset as Dataset),
  );
  await send(stream, { header: { datasetId, sizeBytes, sha256, shared: options.shared === true } }, reply.promise);
  for await (const chunk of createReadStream(file, { highWaterMark: CHUNK_BYTES })) {
    await send(stream, { chunk: chunk as Buffer }, reply.promise);
  }
  stream.end();
  return reply.promise;
}

/** The PEFT files of a folder that ImportAdapter accepts. */
const ADAPTER_FILES = ['adapter_config.json', 'adapter_model.safetensors', 'README.md'];

/**
 * Imports a PEFT adapter folder (adapter_config.json, adapter_model.safetensors, README.md if present);
 * with newVersion, as the next version of an existing adapter.
 */
export async function importAdapterFolder(client: TuneClient | TuneClients, adapterId: string, folder: string, options: { shared?: boolean; newVersion?: boolean } = {}): Promise<Adapter> {
  const clients = generated(client);
  const files: FileEntry[] = [];
  for (const name of ADAPTER_FILES) {
    const file = path.join(folder, name);
    if (!(await fs.stat(file).catch(() => null))) continue;
    files.push({ name, ...(await describeFile(file)) });
  }
  const reply = deferred<Adapter>();
  const stream = clients.adapters.importAdapter((error, response) =>
    error ? reply.reject(error) : reply.resolve(response.adapter as Adapter),
  );
  await send(stream, { header: { adapterId, files, shared: options.shared === true, newVersion: options.newVersion === true } }, reply.promise);
  for (const { name } of files) {
    for await (const data of createReadStream(path.join(folder, name), { highWaterMark: CHUNK_BYTES })) {
      await send(stream, { chunk: { name, data: data as Buffer } }, reply.promise);
    }
  }
  stream.end();
  return reply.promise;
}

/**
 * Exports an adapter into `folder` (created; must not exist) as a PEFT folder, checking every
 * file against the manifest's size and SHA-256.
 */
export async function exportAdapterFolder(client: TuneClient | TuneClients, adapterId: string, folder: string): Promise<Adapter> {
  const clients = generated(client);
  await fs.mkdir(folder);
  const stream = clients.adapters.exportAdapter({ adapterId, chunkSize: 0 });
  let manifest: FileEntry[] = [];
  let adapter: Adapter | undefined;
  const handles = new Map<string, { handle: fs.FileHandle; hash: ReturnType<typeof createHash>; size: number }>();
  try {
    for await (const message of stream as AsyncIterable<ExportAdapterResponse>) {
      if (message.header) {
        manifest = message.header.files;
        adapter = message.header.adapter;
        for (const entry of manifest) {
          if (path.basename(entry.name) !== entry.name) throw new Error(`refusing file name ${JSON.stringify(entry.name)}`);
          handles.set(entry.name, { handle: await fs.open(path.join(folder, entry.name), 'wx'), hash: createHash('sha256'), size: 0 });
        }
      } else if (message.chunk) {
        const target = handles.get(message.chunk.name);
        if (!target) throw new Error(`chunk for unknown file ${JSON.stringify(message.chunk.name)}`);
        target.hash.update(message.chunk.data);
        target.size += message.chunk.data.length;
        await target.handle.write(message.chunk.data);
      }
    }
    for (const entry of manifest) {
      const received = handles.get(entry.name);
      if (!received || received.size !== entry.sizeBytes || received.hash.digest('hex') !== entry.sha256) {
        throw new Error(`${entry.name} does not match its manifest`);
      }
    }
  } finally {
    for (const { handle } of handles.values()) await handle.close();
  }
  if (!adapter) throw new Error('the export stream carried no header');
  return adapter;
}
