// tuneserve.v1.TrainingService: Train, WatchJob, GetJob, ListJobs, CancelJob, ResumeJob. A job belongs
// to the tenant of the key that submitted it: only that tenant (or an admin) sees it; the dataset and
// the starting adapter may be the tenant's own or shared ones.

import { randomBytes } from 'node:crypto';
import type {
  CancelJobRequest,
  CancelJobResponse,
  GetJobRequest,
  GetJobResponse,
  ListJobsRequest,
  ListJobsResponse,
  ResumeJobRequest,
  ResumeJobResponse,
  TrainingServiceServer,
  TrainRequest,
  TrainResponse,
  WatchJobRequest,
  WatchJobResponse,
} from '../gen/tuneserve/v1/training.js';
import { context as otelContext, trace } from '@opentelemetry/api';
import { requireManage, requireUse } from './auth.js';
import type { ServiceContext } from './context.js';
import { invalidArgument, notFound } from './errors.js';
import { resolveHyperparameters } from './hyperparameters.js';
import { requireId } from './ids.js';
import type { JobSubmission } from './job-queue.js';
import type { JobState } from './job-store.js';
import { JsonlChecker } from './jsonl-check.js';
import { decodePageToken, encodePageToken, pageSize } from './paging.js';
import type { CallContext, RpcRunner } from './rpc.js';
import { storedJobState, toEvalResult, toJob, toJobEvent, toTrainingStep } from './wire.js';

const SERVICE = 'TrainingService';

/** A fresh server-chosen job id (matches the id rule). */
function newJobId(): string {
  return `job-${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
}

/** Validates a TrainRequest into a queue submission. */
async function submissionOf(request: TrainRequest, context: ServiceContext, call: CallContext): Promise<JobSubmission> {
  const jobId = request.jobId === '' ? newJobId() : requireId(request.jobId, 'job_id');
  const adapterId = requireId(request.adapterId, 'adapter_id');
  call.annotate({ 'tuneserve.job': jobId, 'tuneserve.adapter': adapterId });
  const hasDatasetId = request.datasetId !== undefined;
  const hasInline = request.inlineJsonl !== undefined;
  if (hasDatasetId === hasInline) throw invalidArgument('dataset', 'set exactly one of dataset_id or inline_jsonl');
  const info = context.engine().modelInfo();
  let dataset: JobSubmission['dataset'];
  if (request.inlineJsonl !== undefined) {
    const bytes = request.inlineJsonl;
    if (bytes.length > context.limits.maxInlineDatasetBytes) {
      throw invalidArgument(
        'inline_jsonl',
        `is ${bytes.length} bytes, above the server's limit of ${context.limits.maxInlineDatasetBytes}; upload it with DatasetService`,
        'DATASET_TOO_LARGE',
      );
    }
    const checker = new JsonlChecker('inline_jsonl', info.config.vocabSize);
    checker.push(bytes);
    checker.finish();
    dataset = { inlineJsonl: bytes };
  } else {
    const datasetId = requireId(request.datasetId ?? '', 'dataset_id');
    requireUse(call.principal, 'dataset', datasetId, await context.datasets.get(datasetId));
    dataset = { datasetId };
  }
  // A new version of an existing adapter: only its own tenant (or an admin) may add one.
  if (request.newVersion && (await context.adapters.exists(adapterId))) {
    requireManage(call.principal, 'adapter', adapterId, await context.adapters.get(adapterId));
  }
  const initAdapterId = request.initAdapterId === '' ? null : requireId(request.initAdapterId, 'init_adapter_id');
  const init = initAdapterId === null ? null : await context.adapters.get(initAdapterId);
  if (init !== null && initAdapterId !== null) requireUse(call.principal, 'adapter', initAdapterId, init);
  return {
    jobId,
    tenant: call.principal.tenant,
    trace: trace.setSpan(otelContext.active(), call.span),
    adapterId,
    newVersion: request.newVersion,
    dataset,
    initAdapterId,
    config: resolveHyperparameters(request.config, init?.config ?? null, { maxSeqLen: info.maxSeqLen, maxPositionEmbeddings: info.config.maxPositionEmbeddings }),
  };
}

/** The TrainingService handlers. */
export function trainingService(context: ServiceContext, rpc: RpcRunner): TrainingServiceServer {
  const { queue, store } = context;
  /** The job, when the caller's tenant owns it (or the caller is an admin). */
  const ownJob = (jobId: string, call: CallContext) => {
    call.annotate({ 'tuneserve.job': jobId });
    const job = store.get(jobId);
    if (!job) throw notFound('job', jobId);
    requireManage(call.principal, 'job', jobId, job);
    call.annotate({ 'tuneserve.adapter': job.adapterId });
    return job;
  };

  return {
    train: rpc.serverStream<TrainRequest, TrainResponse>(SERVICE, 'Train', async (request, writer, call) => {
      const submission = await submissionOf(request, context, call);
      const job = await queue.submit(submission);
      for await (const event of queue.follow(job.jobId, 0, call.signal)) {
        await writer.write({ event: toJobEvent(event) });
        if (request.detach && event.data.kind === 'queued') return;
      }
    }),

    watchJob: rpc.serverStream<WatchJobRequest, WatchJobResponse>(SERVICE, 'WatchJob', async (request, writer, call) => {
      const jobId = requireId(request.jobId, 'job_id');
      ownJob(jobId, call);
      for await (const event of queue.follow(jobId, request.afterSequence, call.signal)) {
        await writer.write({ event: toJobEvent(event) });
      }
    }),

    getJob: rpc.unary<GetJobRequest, GetJobResponse>(SERVICE, 'GetJob', async (request, call) => {
      const jobId = requireId(request.jobId, 'job_id');
      const job = ownJob(jobId, call);
      return {
        job: toJob(job, queue.queuePosition(jobId)),
        steps: request.includeHistory ? store.eventsOfKind(jobId, 'step').map((e) => toTrainingStep(e.data)) : [],
        evaluations: request.includeHistory
          ? store.eventsOfKind(jobId, 'eval').map((e) => toEvalResult(e.data))
          : [],
      };
    }),

    listJobs: rpc.unary<ListJobsRequest, ListJobsResponse>(SERVICE, 'ListJobs', async (request, call) => {
      const limit = pageSize(request.pageSize, 50, 1000);
      const beforeOrdinal = decodePageToken<number>(request.pageToken, 'number');
      const states: JobState[] = request.states.map((state, index) => {
        const stored = storedJobState(state);
        if (stored === null) throw invalidArgument(`states[${index}]`, `is not a known JobState value (${state})`);
        return stored;
      });
      const tenant = call.principal.scopes.has('admin') ? {} : { tenant: call.principal.tenant };
      const jobs = store.list({ states, limit: limit + 1, beforeOrdinal, ...tenant });
      const page = jobs.slice(0, limit);
      const last = page[page.length - 1];
      return {
        jobs: page.map((job) => toJob(job, queue.queuePosition(job.jobId))),
        nextPageToken: jobs.length > limit && last !== undefined ? encodePageToken(last.ordinal) : '',
      };
    }),

    cancelJob: rpc.unary<CancelJobRequest, CancelJobResponse>(SERVICE, 'CancelJob', async (request, call) => {
      const jobId = requireId(request.jobId, 'job_id');
      ownJob(jobId, call);
      const job = queue.cancel(jobId);
      return { job: toJob(job, queue.queuePosition(jobId)) };
    }),

    resumeJob: rpc.unary<ResumeJobRequest, ResumeJobResponse>(SERVICE, 'ResumeJob', async (request, call) => {
      const jobId = requireId(request.jobId, 'job_id');
      ownJob(jobId, call);
      const job = await queue.resume(jobId);
      return { job: toJob(job, queue.queuePosition(jobId)) };
    }),
  };
}
