// The server's one error type and the one function that turns any thrown value into a gRPC
// status: ServiceError for errors the server means, engine error codes mapped to their status,
// and everything else logged and answered INTERNAL with a generic message.

import { Metadata, status } from '@grpc/grpc-js';
import { engineErrorCodes, type EngineErrorCode } from './engine-port.js';
import type { Logger } from './logger.js';
import { encodeStatusDetails, STATUS_DETAILS_KEY } from './status-details.js';

/** The ErrorInfo domain of every error tuneserve raises. */
export const ERROR_DOMAIN = 'tuneserve.dev';

/** One invalid request field (google.rpc.BadRequest.FieldViolation). */
export interface FieldViolation {
  /** Proto field path, e.g. "config.learning_rate". */
  field: string;
  description: string;
}

/** Extra facts an error carries to the client. */
export interface ServiceErrorDetails {
  /** ErrorInfo metadata: lower_snake_case keys, units in the key. */
  metadata?: Record<string, string>;
  /** BadRequest field violations (INVALID_ARGUMENT). */
  fieldViolations?: FieldViolation[];
  /** RetryInfo: how long to wait before retrying. */
  retryAfterMs?: number;
}

/** An error the server raises on purpose: a gRPC code, an UPPER_SNAKE_CASE reason, a message. */
export class ServiceError extends Error {
  override readonly name = 'ServiceError';
  constructor(
    readonly code: status,
    readonly reason: string,
    message: string,
    readonly details: ServiceErrorDetails = {},
  ) {
    super(message);
  }
}

/** INVALID_ARGUMENT naming the field ("<field> <description>"). */
export function invalidArgument(field: string, description: string, reason = 'INVALID_ARGUMENT'): ServiceError {
  return new ServiceError(status.INVALID_ARGUMENT, reason, `${field} ${description}`, {
    fieldViolations: [{ field, description }],
    metadata: { field },
  });
}

/** NOT_FOUND for a named resource, e.g. notFound('adapter', 'x'). */
export function notFound(kind: string, id: string): ServiceError {
  return new ServiceError(status.NOT_FOUND, `${kind.toUpperCase()}_NOT_FOUND`, `${kind} ${JSON.stringify(id)} not found`, {
    metadata: { [`${kind}_id`]: id },
  });
}

/** ALREADY_EXISTS for a named resource. */
export function alreadyExists(kind: string, id: string, message?: string): ServiceError {
  return new ServiceError(
    status.ALREADY_EXISTS,
    `${kind.toUpperCase()}_ALREADY_EXISTS`,
    message ?? `${kind} ${JSON.stringify(id)} already exists`,
    { metadata: { [`${kind}_id`]: id } },
  );
}

/** FAILED_PRECONDITION: the request is fine but the state does not allow it. */
export function failedPrecondition(reason: string, message: string, metadata?: Record<string, string>): ServiceError {
  return new ServiceError(status.FAILED_PRECONDITION, reason, message, metadata ? { metadata } : {});
}

/** RESOURCE_EXHAUSTED with a retry hint. */
export function resourceExhausted(
  reason: string,
  message: string,
  retryAfterMs: number,
  metadata?: Record<string, string>,
): ServiceError {
  return new ServiceError(status.RESOURCE_EXHAUSTED, reason, message, {
    retryAfterMs,
    ...(metadata ? { metadata } : {}),
  });
}

/** UNAVAILABLE (starting or draining): safe to retry, on this or another replica. */
export function unavailable(reason: string, message: string, retryAfterMs = 1000): ServiceError {
  return new ServiceError(status.UNAVAILABLE, reason, message, { retryAfterMs });
}

/**
 * Whether an error (or one of its causes) is the file system saying it is full: ENOSPC or EDQUOT from
 * Node, the same from the engine's native writers (strerror text), SQLite's SQLITE_FULL.
 */
export function isStorageFull(error: unknown): boolean {
  let current: unknown = error;
  for (let depth = 0; current instanceof Error && depth < 8; depth++) {
    const { code, details } = current as { code?: unknown; details?: { syscallCode?: unknown } };
    if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'SQLITE_FULL' || details?.syscallCode === 'ENOSPC' || details?.syscallCode === 'EDQUOT') return true;
    if (/no space left on device|disk quota exceeded|database or disk is full/i.test(current.message)) return true;
    current = (current as { cause?: unknown }).cause;
  }
  return false;
}

/** The reason and message of a write the full data volume refused (RPCs and failed jobs alike). */
export const STORAGE_FULL = { reason: 'STORAGE_FULL', message: "the server's storage is full: nothing was written; free space on its data volume, then retry" } as const;

/** CANCELLED: the client went away or asked to stop. */
export function cancelled(message = 'the call was cancelled'): ServiceError {
  return new ServiceError(status.CANCELLED, 'CANCELLED', message);
}

/** DEADLINE_EXCEEDED: the client's deadline passed before the work finished. */
export function deadlineExceeded(message = 'the deadline passed before the work finished'): ServiceError {
  return new ServiceError(status.DEADLINE_EXCEEDED, 'DEADLINE_EXCEEDED', message);
}

/** Whether `error` looks like an engine error (an Error with a known string `code`). */
export function isEngineError(error: unknown): error is Error & { code: EngineErrorCode } {
  if (!(error instanceof Error)) return false;
  const code: unknown = (error as Error & { code?: unknown }).code;
  return typeof code === 'string' && (engineErrorCodes as readonly string[]).includes(code);
}

/** The gRPC status each engine error code maps to, and the retry hint for transient ones. */
const engineCodeStatus: Record<EngineErrorCode, { code: status; retryAfterMs?: number }> = {
  INVALID_ARGUMENT: { code: status.INVALID_ARGUMENT },
  INVALID_DATASET: { code: status.INVALID_ARGUMENT },
  ADAPTER_INVALID: { code: status.FAILED_PRECONDITION },
  ADAPTER_MISMATCH: { code: status.FAILED_PRECONDITION },
  INTEGRITY_MISMATCH: { code: status.DATA_LOSS },
  ADAPTER_NOT_LOADED: { code: status.FAILED_PRECONDITION },
  ADAPTER_LOAD_FAILED: { code: status.FAILED_PRECONDITION },
  NUMERICAL_ERROR: { code: status.INTERNAL },
  PIN_LIMIT: { code: status.FAILED_PRECONDITION },
  RESOURCE_EXHAUSTED: { code: status.RESOURCE_EXHAUSTED, retryAfterMs: 1000 },
  CAPACITY_EXCEEDED: { code: status.RESOURCE_EXHAUSTED },  // no RetryInfo: a retry cannot fit either
  CANCELLED: { code: status.CANCELLED },
  IO_ERROR: { code: status.INTERNAL },
};

/**
 * Turns anything thrown into a ServiceError: ServiceErrors pass through, engine errors map by
 * code (IO errors are logged and reported without their message, which names server paths),
 * and unknown errors are logged and become INTERNAL with a generic message.
 */
export function toServiceError(
  error: unknown,
  logger: Logger,
  context: string,
  redact: (message: string) => string = (message) => message,
): ServiceError {
  if (error instanceof ServiceError) return error;
  if (isStorageFull(error)) {
    logger.warn({ context, error: error instanceof Error ? error.message : String(error) }, 'storage full');
    return new ServiceError(status.RESOURCE_EXHAUSTED, STORAGE_FULL.reason, STORAGE_FULL.message, { retryAfterMs: 60_000 });
  }
  if (isEngineError(error)) {
    const mapped = engineCodeStatus[error.code];
    if (error.code === 'IO_ERROR') {
      logger.error({ context, error: error.message }, 'engine I/O error');
      return new ServiceError(status.INTERNAL, 'IO_ERROR', 'the server failed to read or write a file');
    }
    return new ServiceError(
      mapped.code,
      error.code,
      redact(error.message),
      mapped.retryAfterMs === undefined ? {} : { retryAfterMs: mapped.retryAfterMs },
    );
  }
  logger.error({ context, error: error instanceof Error ? (error.stack ?? error.message) : String(error) }, 'unexpected error');
  return new ServiceError(status.INTERNAL, 'INTERNAL', 'internal error');
}

/** The status object grpc-js sends: code, message, and google.rpc.Status in the trailers. */
export interface GrpcStatusObject {
  code: status;
  details: string;
  metadata: Metadata;
}

/** Encodes a ServiceError as a grpc-js status with grpc-status-details-bin. */
export function toGrpcStatus(error: ServiceError): GrpcStatusObject {
  const metadata = new Metadata();
  metadata.set(
    STATUS_DETAILS_KEY,
    encodeStatusDetails({
      code: error.code,
      message: error.message,
      reason: error.reason,
      domain: ERROR_DOMAIN,
      metadata: error.details.metadata ?? {},
      fieldViolations: error.details.fieldViolations ?? [],
      retryAfterMs: error.details.retryAfterMs ?? null,
    }),
  );
  return { code: error.code, details: error.message, metadata };
}
