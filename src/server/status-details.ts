// google.rpc.Status rich error details in the grpc-status-details-bin trailer: encoding for the
// server, decoding for clients (CLI, tests, other services written in TypeScript).

import type { Metadata } from '@grpc/grpc-js';
import { Any } from '../gen/google/protobuf/any.js';
import { BadRequest, ErrorInfo, RetryInfo } from '../gen/google/rpc/error_details.js';
import { Status } from '../gen/google/rpc/status.js';

/** The trailer key of the binary google.rpc.Status. */
export const STATUS_DETAILS_KEY = 'grpc-status-details-bin';

const TYPE_URL_PREFIX = 'type.googleapis.com/';

/** The content of one rich error, flat. */
export interface StatusDetails {
  code: number;
  message: string;
  /** ErrorInfo.reason, UPPER_SNAKE_CASE. */
  reason: string;
  /** ErrorInfo.domain. */
  domain: string;
  /** ErrorInfo.metadata. */
  metadata: Record<string, string>;
  /** BadRequest.field_violations. */
  fieldViolations: { field: string; description: string }[];
  /** RetryInfo.retry_delay in milliseconds, or null when absent. */
  retryAfterMs: number | null;
}

/** Encodes rich error details as binary google.rpc.Status. */
export function encodeStatusDetails(details: StatusDetails): Buffer {
  const anys: Any[] = [
    {
      typeUrl: `${TYPE_URL_PREFIX}google.rpc.ErrorInfo`,
      value: Buffer.from(
        ErrorInfo.encode({ reason: details.reason, domain: details.domain, metadata: details.metadata }).finish(),
      ),
    },
  ];
  if (details.fieldViolations.length > 0) {
    anys.push({
      typeUrl: `${TYPE_URL_PREFIX}google.rpc.BadRequest`,
      value: Buffer.from(BadRequest.encode({ fieldViolations: details.fieldViolations }).finish()),
    });
  }
  if (details.retryAfterMs !== null) {
    const ms = Math.max(0, Math.round(details.retryAfterMs));
    anys.push({
      typeUrl: `${TYPE_URL_PREFIX}google.rpc.RetryInfo`,
      value: Buffer.from(
        RetryInfo.encode({
          retryDelay: { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1_000_000 },
        }).finish(),
      ),
    });
  }
  return Buffer.from(Status.encode({ code: details.code, message: details.message, details: anys }).finish());
}

/** Decodes binary google.rpc.Status into its flat form; unknown detail types are skipped. */
export function decodeStatusDetails(bytes: Uint8Array): StatusDetails {
  const decoded = Status.decode(bytes);
  const result: StatusDetails = {
    code: decoded.code,
    message: decoded.message,
    reason: '',
    domain: '',
    metadata: {},
    fieldViolations: [],
    retryAfterMs: null,
  };
  for (const any of decoded.details) {
    const type = any.typeUrl.slice(any.typeUrl.lastIndexOf('/') + 1);
    if (type === 'google.rpc.ErrorInfo') {
      const info = ErrorInfo.decode(any.value);
      result.reason = info.reason;
      result.domain = info.domain;
      result.metadata = info.metadata;
    } else if (type === 'google.rpc.BadRequest') {
      result.fieldViolations = BadRequest.decode(any.value).fieldViolations.map((v) => ({
        field: v.field,
        description: v.description,
      }));
    } else if (type === 'google.rpc.RetryInfo') {
      const delay = RetryInfo.decode(any.value).retryDelay;
      if (delay) result.retryAfterMs = delay.seconds * 1000 + Math.round(delay.nanos / 1_000_000);
    }
  }
  return result;
}

/**
 * Reads the rich details of a failed call from its trailers (a grpc-js client ServiceError's
 * `metadata`), or null when the server sent none.
 */
export function statusDetailsOf(error: { metadata?: Metadata }): StatusDetails | null {
  const values = error.metadata?.get(STATUS_DETAILS_KEY) ?? [];
  const first = values[0];
  if (first === undefined || typeof first === 'string') return null;
  return decodeStatusDetails(first);
}
