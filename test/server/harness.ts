// Test harness for the server suites: a real tuneserve server on 127.0.0.1 (port 0) over the
// engine test double, a temp data root, the generated grpc-js clients, and small promise helpers
// for unary, streaming and client-streaming calls.

import { Metadata, type CallOptions, type ClientReadableStream, type ServiceError } from '@grpc/grpc-js';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'vitest';
import type { ImportAdapterResponse } from '../../src/gen/tuneserve/v1/adapters.js';
import type { UploadDatasetResponse } from '../../src/gen/tuneserve/v1/datasets.js';
import { createLogger, type Logger } from '../../src/server/logger.js';
import { createClients, type TuneClients } from '../../src/client/index.js';
import { createServer, type ServerOptions, type TuneServer } from '../../src/server/server.js';
import { statusDetailsOf, type StatusDetails } from '../../src/server/status-details.js';
import { doubleAdapterFiles, EngineDouble } from './engine-double.js';

/** Ids every RPC must refuse: traversal, absolute paths, separators, empty, too long, odd characters. */
export const hostileIds = ['../x', '/etc/passwd', 'a/b', '', 'x'.repeat(300), '..', 'a..b', '.hidden', 'UPPER', 'a b', 'a\\b', 'a\u0000b', '-x', 'é'];

/** The generated clients, connected to one server (the same bundle clients of the service use). */
export type Clients = TuneClients;

export function connect(port: number): Clients {
  return createClients(`127.0.0.1:${port}`, { plaintext: true });
}

/** One line the server logged: level name, message, and the other fields. */
export interface LoggedLine {
  level: string;
  message: string;
  fields: Record<string, unknown>;
  /** The JSON line exactly as pino wrote it. */
  raw: string;
}

/** The server's own (pino) logger, writing into memory: every line is kept (errors are how unknown failures show up). */
export function recordingLogger(): Logger & { lines: LoggedLine[] } {
  const lines: LoggedLine[] = [];
  const logger = createLogger({
    level: 'debug',
    destination: {
      write(raw: string) {
        const { level, msg, ...fields } = JSON.parse(raw) as Record<string, unknown>;
        lines.push({ level: String(level), message: String(msg), fields, raw });
      },
    },
  });
  return Object.assign(logger, { lines });
}

/** A running test server and everything around it. */
export interface Harness {
  server: TuneServer;
  engine: EngineDouble;
  clients: Clients;
  /** A temp folder holding the data root (and siblings tests may create). */
  sandbox: string;
  dataRoot: string;
  logger: ReturnType<typeof recordingLogger>;
  /** Stops server and clients (not the sandbox). */
  stop(): Promise<void>;
  /** Stops everything and removes the sandbox. */
  dispose(): Promise<void>;
}

export async function makeSandbox(): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), 'tuneserve-server-test-'));
}

/** Starts a server over a fresh (or the given) engine double and data root. */
export async function startHarness(
  options: {
    engine?: EngineDouble;
    sandbox?: string;
    server?: Partial<ServerOptions>;
    /** The test provokes error-level log lines on purpose. */
    allowErrorLogs?: boolean;
  } = {},
): Promise<Harness> {
  const sandbox = options.sandbox ?? (await makeSandbox());
  const dataRoot = path.join(sandbox, 'data');
  const engine = options.engine ?? new EngineDouble();
  const logger = recordingLogger();
  const server = await createServer({
    engine, dataRoot, host: '127.0.0.1', port: 0, transport: { plaintext: true }, logger, shutdownGraceMs: 2000, ...options.server,
  });
  const clients = connect(server.port);
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    clients.close();
    await server.close({ graceMs: 500 });
  };
  return {
    server,
    engine,
    clients,
    sandbox,
    dataRoot,
    logger,
    stop,
    dispose: async () => {
      await stop();
      // An error-level line means an unknown failure reached the INTERNAL path: tests must say they expect it.
      if (!options.allowErrorLogs) expect(logger.lines.filter((line) => line.level === 'error')).toEqual([]);
      await fs.rm(sandbox, { recursive: true, force: true });
    },
  };
}

type UnaryMethod<Request, Response> = (
  request: Request,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Response) => void,
) => unknown;

/** Calls a unary method as a promise. */
export function call<Request, Response>(
  method: UnaryMethod<Request, Response>,
  client: object,
  request: Request,
  options: Partial<CallOptions> = {},
  metadata = new Metadata(),
): Promise<Response> {
  return new Promise((resolve, reject) => {
    method.call(client, request, metadata, options, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

/** Reads a server stream to its end: every message, and the error it ended with (or null). */
export function collect<T>(stream: ClientReadableStream<T>): Promise<{ messages: T[]; error: ServiceError | null }> {
  return new Promise((resolve) => {
    const messages: T[] = [];
    stream.on('data', (message: T) => messages.push(message));
    stream.on('error', (error: ServiceError) => resolve({ messages, error }));
    stream.on('end', () => resolve({ messages, error: null }));
  });
}

export const sha256 = (data: Uint8Array | string): string => createHash('sha256').update(data).digest('hex');

/** Uploads a dataset through the client-streaming RPC. */
export function upload(
  clients: Clients,
  datasetId: string,
  content: string | Buffer,
  overrides: { sizeBytes?: number; sha256?: string; chunkSize?: number } = {},
): Promise<UploadDatasetResponse> {
  const bytes = Buffer.isBuffer(content) ? content : Buffer.from(content);
  return new Promise((resolve, reject) => {
    const stream = clients.datasets.uploadDataset((error, response) => (error ? reject(error) : resolve(response)));
    stream.write({ header: { datasetId, sizeBytes: overrides.sizeBytes ?? bytes.length, sha256: overrides.sha256 ?? sha256(bytes) } });
    const chunkSize = overrides.chunkSize ?? 64 * 1024;
    for (let offset = 0; offset < bytes.length; offset += chunkSize) {
      stream.write({ chunk: bytes.subarray(offset, offset + chunkSize) });
    }
    stream.end();
  });
}

/** Asserts that a promise rejects with a gRPC status (and reason / field); returns the details. */
export async function expectStatus(
  promise: Promise<unknown>,
  code: number,
  expected: { reason?: string; field?: string; retry?: boolean } = {},
): Promise<StatusDetails> {
  let error: ServiceError | null = null;
  try {
    await promise;
  } catch (caught) {
    error = caught as ServiceError;
  }
  expect(error, 'the call should have failed').not.toBeNull();
  return expectError(error as ServiceError, code, expected);
}

/** Asserts a gRPC error's code, reason, field and retry hint; returns the details. */
export function expectError(
  error: ServiceError | null,
  code: number,
  expected: { reason?: string; field?: string; retry?: boolean } = {},
): StatusDetails {
  expect(error, 'the call should have failed').not.toBeNull();
  const failure = error as ServiceError;
  expect({ code: failure.code, details: failure.details }).toMatchObject({ code });
  const details = statusDetailsOf(failure);
  if (expected.reason !== undefined || expected.field !== undefined || expected.retry !== undefined) {
    expect(details, 'grpc-status-details-bin should be present').not.toBeNull();
  }
  if (details) {
    expect(details.code).toBe(code);
    expect(details.domain).toBe('tuneserve.dev');
    expect(details.reason).toMatch(/^[A-Z][A-Z0-9_]*$/);
    if (expected.reason !== undefined) expect(details.reason).toBe(expected.reason);
    if (expected.field !== undefined) expect(details.fieldViolations.map((v) => v.field)).toContain(expected.field);
    if (expected.retry === true) expect(details.retryAfterMs).toBeGreaterThan(0);
  }
  return details as StatusDetails;
}

/** Polls until `check` returns a truthy value (or times out). */
export async function eventually<T>(check: () => T | Promise<T>, timeoutMs = 5000): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value as NonNullable<T>;
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Lists every file under a folder, relative paths, sorted. */
export async function tree(root: string): Promise<string[]> {
  const entries = await fs.readdir(root, { recursive: true, withFileTypes: true }).catch(() => []);
  return entries
    .filter((entry) => entry.isFile())
    .map((entry) => path.relative(root, path.join(entry.parentPath, entry.name)))
    .sort();
}

/**
 * Imports an adapter through the client-streaming RPC: by default the double's placeholder PEFT
 * files; `files` replaces them, `manifest` overrides the announced entries.
 */
export function importAdapter(
  clients: Clients,
  adapterId: string,
  options: {
    files?: Record<string, Buffer>;
    hidden?: number;
    manifest?: { name: string; sizeBytes: number; sha256: string }[];
    chunkSize?: number;
    /** Publish as the next version when the adapter exists. */
    newVersion?: boolean;
    metadata?: Metadata;
  } = {},
): Promise<ImportAdapterResponse> {
  const files = options.files ?? doubleAdapterFiles(options.hidden === undefined ? {} : { hidden: options.hidden });
  const manifest =
    options.manifest ?? Object.entries(files).map(([name, bytes]) => ({ name, sizeBytes: bytes.length, sha256: sha256(bytes) }));
  return new Promise((resolve, reject) => {
    const stream = clients.adapters.importAdapter(options.metadata ?? new Metadata(), (error, response) => (error ? reject(error) : resolve(response)));
    stream.write({ header: { adapterId, files: manifest, shared: false, newVersion: options.newVersion === true } });
    const chunkSize = options.chunkSize ?? 64 * 1024;
    for (const [name, bytes] of Object.entries(files)) {
      for (let offset = 0; offset < bytes.length; offset += chunkSize) {
        stream.write({ chunk: { name, data: bytes.subarray(offset, offset + chunkSize) } });
      }
    }
    stream.end();
  });
}
