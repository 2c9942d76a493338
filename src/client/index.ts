// tuneserve/client: the TypeScript client of a tuneserve server, for other backend services.
//
//   import { connect, GenerateRequest } from 'tuneserve/client';
//   const tune = connect('tuneserve.ml.svc:50051', { apiKey: process.env.TUNESERVE_API_KEY, tls: { ca } });
//   const info = await tune.model.getModelInfo({});
//   for await (const chunk of tune.generation.generate(GenerateRequest.fromPartial({ text: 'Hi', adapterId: 'acme' }))) …
//
// connect() gives every unary RPC as a promise and every server stream as an async iterable, with
// deadlines, x-request-id, cancellation and retries that honour the server's RetryInfo; the message
// types and enums of tuneserve.v1 are exported from here too; statusDetailsOf reads an error's
// google.rpc details (reason, field violations, retry delay).

export { connect, createClients, channelCredentials, DEFAULT_DEADLINE_MS, type ConnectOptions, type TuneClient, type TuneClients } from './connection.js';
export { defaultRetryPolicy, isServiceError, retryDelay, type RetryPolicy } from './retry.js';
export type { CallDefaults, CallOptions, TypedService } from './typed-service.js';
export { describeFile, exportAdapterFolder, importAdapterFolder, uploadDatasetFile } from './files.js';
export { statusDetailsOf, type StatusDetails } from '../server/status-details.js';
export { status } from '@grpc/grpc-js';
// Each generated file has these helpers; one copy is exported (the star exports below skip them).
export { protobufPackage, protobufFileName, type DeepPartial, type MessageFns } from '../gen/tuneserve/v1/common.js';
export * from '../gen/tuneserve/v1/adapters.js';
export * from '../gen/tuneserve/v1/common.js';
export * from '../gen/tuneserve/v1/datasets.js';
export * from '../gen/tuneserve/v1/generation.js';
export * from '../gen/tuneserve/v1/model.js';
export * from '../gen/tuneserve/v1/training.js';
