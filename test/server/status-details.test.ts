// google.rpc.Status in grpc-status-details-bin: what the server encodes decodes back, with the
// type URLs and field numbers of the public google.rpc definitions.

import { status } from '@grpc/grpc-js';
import { describe, expect, it } from 'vitest';
import { Any } from '../../src/gen/google/protobuf/any.js';
import { Status } from '../../src/gen/google/rpc/status.js';
import { invalidArgument, resourceExhausted, toGrpcStatus, toServiceError } from '../../src/server/errors.js';
import { decodeStatusDetails, STATUS_DETAILS_KEY } from '../../src/server/status-details.js';
import { recordingLogger } from './harness.js';

describe('status details', () => {
  it('encodes ErrorInfo and BadRequest for a validation error', () => {
    const grpcStatus = toGrpcStatus(invalidArgument('config.rank', 'must be an integer from 0 to 256'));
    const bytes = grpcStatus.metadata.get(STATUS_DETAILS_KEY)[0] as Buffer;
    const raw = Status.decode(bytes);
    expect(raw.details.map((d: Any) => d.typeUrl)).toEqual([
      'type.googleapis.com/google.rpc.ErrorInfo',
      'type.googleapis.com/google.rpc.BadRequest',
    ]);
    const details = decodeStatusDetails(bytes);
    expect(details).toMatchObject({
      code: status.INVALID_ARGUMENT,
      reason: 'INVALID_ARGUMENT',
      domain: 'tuneserve.dev',
      fieldViolations: [{ field: 'config.rank', description: 'must be an integer from 0 to 256' }],
      retryAfterMs: null,
    });
    expect(grpcStatus.details).toBe('config.rank must be an integer from 0 to 256');
  });

  it('carries RetryInfo to the millisecond', () => {
    const grpcStatus = toGrpcStatus(resourceExhausted('TRAINING_QUEUE_FULL', 'full', 12_345, { max_queued_jobs: '3' }));
    const details = decodeStatusDetails(grpcStatus.metadata.get(STATUS_DETAILS_KEY)[0] as Buffer);
    expect(details.retryAfterMs).toBe(12_345);
    expect(details.metadata).toEqual({ max_queued_jobs: '3' });
  });

  it('maps engine codes and hides unknown errors behind INTERNAL, logging them', () => {
    const logger = recordingLogger();
    const mismatch = toServiceError(Object.assign(new Error('shape'), { code: 'ADAPTER_MISMATCH' }), logger, 'test');
    expect(mismatch.code).toBe(status.FAILED_PRECONDITION);
    expect(mismatch.reason).toBe('ADAPTER_MISMATCH');
    const full = toServiceError(Object.assign(new Error('kv'), { code: 'RESOURCE_EXHAUSTED' }), logger, 'test');
    expect(full.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(full.details.retryAfterMs).toBeGreaterThan(0);
    const unknown = toServiceError(new TypeError('secret internals at /srv/x'), logger, 'test');
    expect(unknown.code).toBe(status.INTERNAL);
    expect(unknown.message).toBe('internal error');
    expect(logger.lines.some((l) => l.level === 'error' && String(l.fields?.error).includes('secret internals'))).toBe(true);
  });
});
