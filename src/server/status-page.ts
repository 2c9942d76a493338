// The status page: plain HTML and JavaScript served by the process on its own HTTP port (off by
// default; --status-port). It shows the training jobs with live loss curves (server-sent events
// replaying a job's stored steps and evaluations, then following new ones), the adapter pool and
// device memory. It has no authentication and shows every tenant's jobs and adapters: it listens on
// 127.0.0.1 by default (reach it with `kubectl port-forward`); do not expose it.
//
//   GET /                     the page          GET /app.js   its script
//   GET /api/status           JSON snapshot: server state, model, memory, pool, adapters, recent jobs
//   GET /api/jobs/<id>/events text/event-stream: one "step" or "eval" (with the forgetting check's
//                             losses when the job runs it) event per stored event, live
//                             after the history, then "end" when the job ends

import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { isValidId } from './ids.js';
import type { JobEventRecord } from './job-store.js';
import { STATUS_PAGE_HTML, STATUS_PAGE_SCRIPT } from './status-page-assets.js';

/** What the page shows, read when asked. */
export interface StatusSnapshot {
  state: string;
  model: { name: string; device: string; quantization: string } | null;
  memory: {
    deviceTotalBytes: number;
    deviceFreeBytes: number;
    uses: Record<string, number>;
    kvCacheBlocks: number;
    kvCacheBlocksUsed: number;
  } | null;
  /** The adapter pool: slots, the versions in them ("<id>@v<N>"), the host tier, its counters since start, and training's share of the engine. */
  pool: {
    slots: number;
    loaded: string[];
    pinned: number;
    hostBytes: number;
    hostBudgetBytes: number;
    waitingRequests: number;
    hits: number;
    hostHits: number;
    loads: number;
    evictions: number;
    trainingShare: number;
  } | null;
  adapters: { adapterId: string; tenant: string; shared: boolean; loaded: boolean; finalLoss: number | null }[];
  jobs: {
    jobId: string;
    state: string;
    adapterId: string;
    tenant: string;
    step: number;
    totalSteps: number;
    loss: number | null;
    evalLoss: number | null;
    createTime: number;
  }[];
  queue: { queued: number; running: number };
}

/** Where the page gets its data (the server provides it: TuneServer.status). */
export interface StatusSource {
  snapshot(): Promise<StatusSnapshot>;
  /** NOT_FOUND-like null when the job does not exist. */
  jobExists(jobId: string): boolean;
  /** A job's events after a sequence number: the stored history, then live ones, until it ends. */
  follow(jobId: string, afterSequence: number, signal: AbortSignal): AsyncGenerator<JobEventRecord>;
}

export interface StatusPage {
  port: number;
  close(): Promise<void>;
}

const SECURITY_HEADERS = {
  'content-security-policy': "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'",
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
  'cache-control': 'no-store',
};

/** Starts the status page's HTTP server. */
export async function startStatusPage(source: StatusSource, options: { host: string; port: number }): Promise<StatusPage> {
  const open = new Set<ServerResponse>();
  const server: Server = createServer((request, response) => {
    void handle(source, request, response, open).catch(() => {
      if (!response.headersSent) response.writeHead(500, SECURITY_HEADERS);
      response.end();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port, options.host, () => resolve());
  });
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      for (const response of open) response.end();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

async function handle(source: StatusSource, request: IncomingMessage, response: ServerResponse, open: Set<ServerResponse>): Promise<void> {
  if (request.method !== 'GET') {
    response.writeHead(405, { ...SECURITY_HEADERS, allow: 'GET' }).end();
    return;
  }
  const url = new URL(request.url ?? '/', 'http://status.invalid');
  if (url.pathname === '/') {
    response.writeHead(200, { ...SECURITY_HEADERS, 'content-type': 'text/html; charset=utf-8' }).end(STATUS_PAGE_HTML);
    return;
  }
  if (url.pathname === '/app.js') {
    response.writeHead(200, { ...SECURITY_HEADERS, 'content-type': 'text/javascript; charset=utf-8' }).end(STATUS_PAGE_SCRIPT);
    return;
  }
  if (url.pathname === '/favicon.ico') {
    response.writeHead(204, SECURITY_HEADERS).end();
    return;
  }
  if (url.pathname === '/api/status') {
    response.writeHead(200, { ...SECURITY_HEADERS, 'content-type': 'application/json' }).end(JSON.stringify(await source.snapshot()));
    return;
  }
  const match = /^\/api\/jobs\/([^/]+)\/events$/.exec(url.pathname);
  if (match) {
    const jobId = decodeURIComponent(match[1] ?? '');
    if (!isValidId(jobId) || !source.jobExists(jobId)) {
      response.writeHead(404, SECURITY_HEADERS).end();
      return;
    }
    const after = Number(request.headers['last-event-id'] ?? url.searchParams.get('after') ?? 0);
    await streamJob(source, jobId, Number.isSafeInteger(after) && after >= 0 ? after : 0, response, open);
    return;
  }
  response.writeHead(404, SECURITY_HEADERS).end();
}

/** Server-sent events of one job: id = the event's sequence, so a reconnect resumes where it left. */
async function streamJob(source: StatusSource, jobId: string, after: number, response: ServerResponse, open: Set<ServerResponse>): Promise<void> {
  response.writeHead(200, { ...SECURITY_HEADERS, 'content-type': 'text/event-stream', connection: 'keep-alive' });
  response.write('retry: 2000\n\n');
  const controller = new AbortController();
  open.add(response);
  response.on('close', () => {
    controller.abort();
    open.delete(response);
  });
  const send = (event: string, id: number, data: unknown): void => {
    response.write(`event: ${event}\nid: ${id}\ndata: ${JSON.stringify(data)}\n\n`);
  };
  for await (const record of source.follow(jobId, after, controller.signal)) {
    const { data } = record;
    if (data.kind === 'step') send('step', record.sequence, { step: data.step, totalSteps: data.totalSteps, loss: data.loss, learningRate: data.learningRate, tokensPerSecond: data.tokensPerSecond });
    else if (data.kind === 'eval') {
      send('eval', record.sequence, {
        step: data.step,
        loss: data.loss,
        forgettingLoss: data.forgettingLoss ?? null,
        forgettingBaseLoss: data.forgettingBaseLoss ?? null,
      });
    }
    else if (data.kind === 'completed' || data.kind === 'failed' || data.kind === 'cancelled' || data.kind === 'interrupted') {
      send('end', record.sequence, { state: data.kind });
    }
  }
  response.end();
}
