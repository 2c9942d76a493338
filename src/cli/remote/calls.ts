// Calls and their errors for the remote commands: a unary call as a promise with a deadline, the
// connection from the common flags (address, API key, TLS or plaintext), and a failed call turned into
// one line with the gRPC status name, the ErrorInfo reason, the field violations and the retry hint.

import { Metadata, status, type CallOptions, type Client, type ClientUnaryCall, type ServiceError } from '@grpc/grpc-js';
import { EngineError } from '../../engine/errors.js';
import { readFileSync } from 'node:fs';
import { statusDetailsOf, type ConnectOptions } from '../../client/index.js';
import { text, type Flags } from '../flags.js';

/** Where a command writes: stdout for results, stderr for progress and notes (tests pass their own). */
export interface CommandIo {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
}

export const processIo: CommandIo = { stdout: process.stdout, stderr: process.stderr };

/**
 * The connection the flags (or TUNESERVE_* variables) ask for: the API key (--api-key, or the older
 * --token), and TLS with the system's roots unless --tls-ca names the server's CA, with a client
 * certificate for mutual TLS, or --plaintext.
 */
export function connectionOptions(flags: Flags, env: NodeJS.ProcessEnv = process.env): ConnectOptions {
  const apiKey = text(flags, 'api-key') ?? text(flags, 'token') ?? env.TUNESERVE_API_KEY ?? env.TUNESERVE_TOKEN;
  const plaintext = flags.plaintext === true || /^(1|true|yes|on)$/i.test(env.TUNESERVE_PLAINTEXT ?? '');
  const files = { ca: text(flags, 'tls-ca') ?? env.TUNESERVE_TLS_CA, cert: text(flags, 'tls-cert') ?? env.TUNESERVE_TLS_CERT, key: text(flags, 'tls-key') ?? env.TUNESERVE_TLS_KEY };
  const given = Object.entries(files).filter(([, file]) => file);
  if (plaintext && given.length > 0) throw new EngineError('INVALID_ARGUMENT', '--plaintext cannot be combined with --tls-ca/--tls-cert/--tls-key', { field: 'plaintext' });
  if ((files.cert === undefined) !== (files.key === undefined)) throw new EngineError('INVALID_ARGUMENT', '--tls-cert and --tls-key go together (mutual TLS)', { field: 'tls-cert' });
  const read = (file: string | undefined): Buffer | undefined => (file ? readFileSync(file) : undefined);
  return {
    ...(apiKey ? { apiKey } : {}),
    ...(plaintext ? { plaintext: true } : { tls: { ...(files.ca ? { ca: read(files.ca) } : {}), ...(files.cert ? { cert: read(files.cert), key: read(files.key) } : {}) } }),
  };
}

type UnaryMethod<Request, Response> = (
  request: Request,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Response) => void,
) => ClientUnaryCall;

/** Calls a unary method of a generated client as a promise, with an optional deadline. */
export function unary<Request, Response>(
  client: Client,
  method: UnaryMethod<Request, Response>,
  request: Request,
  timeoutMs: number | null = DEFAULT_UNARY_TIMEOUT_MS,
): Promise<Response> {
  const options: Partial<CallOptions> = timeoutMs === null ? {} : { deadline: new Date(Date.now() + timeoutMs) };
  return new Promise((resolve, reject) => {
    method.call(client, request, new Metadata(), options, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

export const DEFAULT_UNARY_TIMEOUT_MS = 30_000;

/** True for the errors grpc-js client calls fail with. */
export function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as { code?: unknown }).code === 'number' && 'metadata' in error;
}

/** The name of a gRPC status code, e.g. 5 → NOT_FOUND. */
export function statusName(code: number): string {
  return status[code] ?? `CODE_${code}`;
}

/**
 * One line saying why a call failed: the server's message, then its ErrorInfo reason, field
 * violations and retry hint, e.g. `ADAPTER_NOT_FOUND: adapter "x" not found`.
 */
export function describeCallError(error: ServiceError): string {
  const details = statusDetailsOf(error);
  const message = (details?.message || error.details || error.message).replace(/\s+/g, ' ').trim();
  let line = details?.reason ? `${details.reason}: ${message}` : message;
  // Violations the message does not already say (it usually names the first one).
  const violations = (details?.fieldViolations ?? []).filter((v) => !message.includes(`${v.field} ${v.description}`));
  if (violations.length > 0) line += ` [${violations.map((v) => `${v.field}: ${v.description}`).join('; ')}]`;
  if (details?.retryAfterMs != null) line += ` (retry in ${(details.retryAfterMs / 1000).toFixed(1)} s)`;
  return line;
}

/** Turns a failed call into the CLI's error (code = status name, so main prints `[NOT_FOUND] ...`). */
export function cliError(error: unknown): unknown {
  if (!isServiceError(error)) return error;
  return new EngineError(statusName(error.code), describeCallError(error), undefined, { cause: error });
}
