// Load with faults on loopback, on a real `tuneserve serve` process (tiny model, CPU): Generate streams
// from the load generator (src/loadgen, Poisson arrivals, more streams than the server's generation
// limit, random client cancels and deadlines) over the base and an adapter, plus slow readers that pause
// after every message; meanwhile a training job runs, datasets are uploaded and deleted and adapters
// imported and deleted, and some export readers stall (never read). Figures: sent, completed, failed by
// code, lost (must be 0), hung (must be 0), latency / first-token / inter-token p50 and p99, the server's
// peak RSS; the stalled readers must not grow the server's memory without bound (the server waits for
// 'drain' instead of buffering: its drain-wait counter moves, its RSS barely does), and once they read
// again they get every byte.

import { createHash } from 'node:crypto';
import http2 from 'node:http2';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Metadata, status, type ServiceError } from '@grpc/grpc-js';

import { createClients, importAdapterFolder, uploadDatasetFile, type TuneClients } from '../../src/client/index.js';
import { Engine } from '../../src/engine/engine.js';
import { makeModel } from '../../src/engine/make-model.js';
import { createLoraConfig } from '../../src/engine/peft-config.js';
import { ExportAdapterRequest, ExportAdapterResponse } from '../../src/gen/tuneserve/v1/adapters.js';
import { GenerateRequest } from '../../src/gen/tuneserve/v1/generation.js';
import { percentiles, runLoad } from '../../src/loadgen/load.js';
import { JobState, TrainingConfig } from '../../src/gen/tuneserve/v1/training.js';
import { FULL, record } from '../helpers/fuzz.js';
import { Random } from '../helpers/random.js';
import { inheritedSanitizerEnv, SANITIZER_REPORT } from '../helpers/sanitizer.js';
import { freePort } from '../helpers/ports.js';
import { startServe, type ServeProcess } from '../helpers/serve-process.js';
import { call, collect, eventually } from '../server/harness.js';

/** Resident and peak resident memory of a process, MiB (Linux /proc). */
async function memoryOf(pid: number): Promise<{ rss: number; peak: number }> {
  const text = await readFile(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0);
  return { rss: kib('VmRSS') / 1024, peak: kib('VmHWM') / 1024 };
}

/**
 * An ExportAdapter call by a raw HTTP/2 client that reads nothing until resume(): the stream is paused
 * from the start, so Node grants no more HTTP/2 window (stream or connection) than the first 64 KiB and
 * whatever else the server would send stays with the server. resume() reads the rest and resolves with
 * the adapter weights file reassembled and the call's outcome. (A grpc-js client cannot stall a server
 * this way: paused, it still reads into its own memory.)
 */
function stalledExport(session: http2.ClientHttp2Session, adapterId: string, chunkSize: number): { resume(): Promise<{ error: string | null; file: Buffer }> } {
  const stream = session.request({ ':method': 'POST', ':path': '/tuneserve.v1.AdapterService/ExportAdapter', 'content-type': 'application/grpc', te: 'trailers' });
  const body = ExportAdapterRequest.encode(ExportAdapterRequest.fromPartial({ adapterId, chunkSize })).finish();
  const frame = Buffer.alloc(5 + body.length);
  frame.writeUInt32BE(body.length, 1);
  frame.set(body, 5);
  stream.end(frame);
  stream.pause();
  const received: Buffer[] = [];
  const ended = new Promise<string | null>((resolve) => {
    let grpcStatus: string | null = null;
    stream.on('trailers', (trailers) => { grpcStatus = String(trailers['grpc-status']); });
    stream.on('response', (headers) => { if (headers['grpc-status'] !== undefined) grpcStatus = String(headers['grpc-status']); });
    stream.on('data', (chunk: Buffer) => received.push(chunk));
    stream.on('close', () => resolve(grpcStatus === '0' ? null : `grpc-status ${grpcStatus}`));
    stream.on('error', (error) => resolve(String(error)));
  });
  return {
    async resume() {
      stream.resume();
      const error = await ended;
      // Length-prefixed gRPC messages: a flag byte, a 4-byte big-endian length, the protobuf bytes.
      const bytes = Buffer.concat(received);
      const parts: Buffer[] = [];
      for (let at = 0; at + 5 <= bytes.length; ) {
        const length = bytes.readUInt32BE(at + 1);
        const message = ExportAdapterResponse.decode(bytes.subarray(at + 5, at + 5 + length));
        if (message.chunk?.name === 'adapter_model.safetensors') parts.push(Buffer.from(message.chunk.data));
        at += 5 + length;
      }
      return { error, file: Buffer.concat(parts) };
    },
  };
}

describe('load with faults on loopback', () => {
  let sandbox: string;
  let serve: ServeProcess;
  let clients: TuneClients;
  let metricsPort: number;

  beforeAll(async () => {
    sandbox = await mkdtemp(join(tmpdir(), 'tuneserve-load-'));
    await makeModel({ preset: 'tiny', outDir: join(sandbox, 'model'), seed: 7 });
    const engine = await Engine.load(join(sandbox, 'model'), { device: 'cpu', quant: 'nf4', maxSeqLen: 32, log: () => {} });
    try {
      // Rank 256 on every linear layer: a 2.5 MB weights file, 40 export chunks of 64 KiB.
      await engine.saveAdapter(engine.createAdapter(createLoraConfig({ r: 256, alpha: 16, targets: 'all-linear' }), 5), join(sandbox, 'adapter'));
    } finally {
      engine.close();
    }
    metricsPort = await freePort();
    serve = await startServe(['--model', join(sandbox, 'model'), '--data-root', join(sandbox, 'data'), '--host', '127.0.0.1', '--plaintext', '--device', 'cpu',
      '--threads', '2', '--max-seq-len', '256', '--max-concurrent-generations', '8', '--metrics-port', String(metricsPort), '--metrics-host', '127.0.0.1'], inheritedSanitizerEnv());
    clients = createClients(`127.0.0.1:${serve.port}`, { plaintext: true });
    await importAdapterFolder(clients, 'ad', join(sandbox, 'adapter'));
    await writeFile(join(sandbox, 'rows.jsonl'), Array.from({ length: 12 }, (_, i) => JSON.stringify({ prompt: `Q${i}?`, completion: ` A${i}.` })).join('\n'));
    await uploadDatasetFile(clients, 'qa', join(sandbox, 'rows.jsonl'));
  }, 300_000);

  afterAll(async () => {
    clients?.close();
    serve?.kill();
    if (serve) await serve.exited;
    if (sandbox) await rm(sandbox, { recursive: true, force: true });
  });

  const drainWaits = async (): Promise<number> => {
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    return [...text.matchAll(/^tuneserve_stream_drain_waits_total\{[^}]*\} (\d+)/gm)].reduce((sum, m) => sum + Number(m[1]), 0);
  };

  it('every request ends (0 lost, 0 hung) while training, uploads, imports and stalled readers go on', async () => {
    const pid = serve.child.pid!;
    const alongside: string[] = [];

    // Stalled readers: exports of the 2.5 MB adapter in 4 KiB chunks by clients that stop reading at the
    // HTTP/2 level (a grpc-js client keeps reading into its own memory when paused, so it cannot stall one).
    const stalledCount = 16;
    const waitsBefore = await drainWaits();
    const rssBefore = (await memoryOf(pid)).rss;
    const stallSession = http2.connect(`http://127.0.0.1:${serve.port}`);
    const stalled = Array.from({ length: stalledCount }, () => stalledExport(stallSession, 'ad', 4096));

    // Buffered whole, the stalled files would cost the server 16 × 2.5 MB at once; it must not.
    await new Promise((resolve) => setTimeout(resolve, 2000));
    const rssStalled = (await memoryOf(pid)).rss;
    const waitsStalled = (await drainWaits()) - waitsBefore;

    // A training job alongside.
    const steps = FULL ? 60 : 12;
    await collect(clients.training.train({ jobId: 'alongside', adapterId: 'trained', datasetId: 'qa', initAdapterId: '', detach: true,
      config: TrainingConfig.fromPartial({ rank: 4, alpha: 8, targetModules: ['q_proj', 'v_proj'], learningRate: 1e-3, maxSteps: steps, batchSize: 2, gradAccum: 1, seed: 3 }) }));

    // Uploads and imports in between, until the load ends.
    let loading = true;
    let churn = 0;
    const churnLoop = (async () => {
      for (let k = 0; loading; k++) {
        await uploadDatasetFile(clients, `up-${k}`, join(sandbox, 'rows.jsonl'));
        await importAdapterFolder(clients, `imp-${k}`, join(sandbox, 'adapter'));
        await call(clients.datasets.deleteDataset, clients.datasets, { datasetId: `up-${k}` });
        await call(clients.adapters.deleteAdapter, clients.adapters, { adapterId: `imp-${k}` });
        churn++;
      }
    })();

    let peak = 0;
    const sampler = setInterval(() => void memoryOf(pid).then((m) => { peak = Math.max(peak, m.peak); }).catch(() => {}), 250);
    // Slow readers alongside the generator's streams: each pauses 20-200 ms after every message.
    const slow = { sent: 0, completed: 0, failed: {} as Record<string, number>, lost: 0, hung: 0 };
    const slowLoop = (async () => {
      for (let k = 0; loading; k++) {
        const random = new Random(7000 + k);
        const deadline = Date.now() + 60_000;
        const stream = clients.generation.generate(GenerateRequest.fromPartial({ text: 'Tell me a story.', adapterId: random.pick(['', 'ad']), maxTokens: random.int(4, 24) }), new Metadata(), { deadline });
        slow.sent++;
        const ended = new Promise<number>((resolve) => {
          stream.on('data', () => {
            stream.pause();
            setTimeout(() => stream.resume(), random.int(20, 200));
          });
          stream.on('error', (error: ServiceError) => resolve(error.code));
          stream.on('end', () => resolve(status.OK));
        });
        const code = await Promise.race([ended, new Promise<null>((resolve) => setTimeout(() => resolve(null), 65_000))]);
        if (code === null) {
          if ((await Promise.race([ended, new Promise<null>((resolve) => setTimeout(() => resolve(null), 30_000))])) === null) slow.lost++;
          else slow.hung++;
        } else if (code === status.OK) slow.completed++;
        else slow.failed[status[code]!] = (slow.failed[status[code]!] ?? 0) + 1;
      }
    })();

    const report = await runLoad({
      clients, adapters: ['', 'ad'], requests: FULL ? 3000 : 300, ratePerSecond: 25, streams: 12, seed: 51,
      promptTokens: { min: 4, max: 32 }, maxTokens: { min: 2, max: 24 }, cancelFraction: 0.2, deadlineFraction: 0.2,
      deadlineMs: { min: 20, max: 600 }, expectedMsPerToken: 200, hungGraceMs: 15_000,
    });
    loading = false;
    await Promise.all([churnLoop, slowLoop]);
    const latency = percentiles(report.records.filter((r) => r.outcome === 'completed' && r.endedAt !== null).map((r) => r.endedAt! - r.sentAt));
    const failedByCode: Record<string, number> = { ...report.failed };
    for (const [code, n] of Object.entries(slow.failed)) failedByCode[code] = (failedByCode[code] ?? 0) + n;
    if (report.cancelled > 0) failedByCode.CANCELLED = (failedByCode.CANCELLED ?? 0) + report.cancelled;
    const figures = {
      sent: report.sent + slow.sent, completed: report.completed + slow.completed, failedByCode,
      lost: report.lost + slow.lost, hung: report.hung + slow.hung,
      latencyMs: { p50: Math.round(latency.p50), p99: Math.round(latency.p99) },
      firstTokenMs: { p50: Math.round(report.ttftMs.p50), p99: Math.round(report.ttftMs.p99) },
      interTokenMs: { p50: Math.round(report.interTokenMs.p50), p99: Math.round(report.interTokenMs.p99) },
    };

    // The stalled readers held the server back through the whole load, then got every byte.
    const waits = (await drainWaits()) - waitsBefore;
    const want = await readFile(join(sandbox, 'adapter', 'adapter_model.safetensors'));
    const results = await Promise.all(stalled.map((s) => s.resume()));
    stallSession.close();
    clearInterval(sampler);
    peak = Math.max(peak, (await memoryOf(pid)).peak);
    for (const r of results) {
      expect(r.error).toBeNull();
      expect(createHash('sha256').update(r.file).digest('hex')).toBe(createHash('sha256').update(want).digest('hex'));
    }
    alongside.push(`${stalledCount} export readers stalled through the whole load, then read: every byte arrived (${(want.length / 1e6).toFixed(1)} MB each)`);

    const job = await eventually(async () => {
      const { job: j } = await call(clients.training.getJob, clients.training, { jobId: 'alongside', includeHistory: false });
      return j?.state === JobState.JOB_STATE_SUCCEEDED || j?.state === JobState.JOB_STATE_FAILED ? j : null;
    }, 600_000);
    expect(job.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    alongside.push(`a training job of ${steps} steps ran alongside and succeeded`);
    alongside.push(`${churn} rounds of upload + import + delete of a dataset and an adapter ran in between, all succeeded`);

    const rssGrowthMb = Math.round(rssStalled - rssBefore);
    const description = `${figures.sent} Generate streams on loopback: ${report.sent} from the load generator (src/loadgen: Poisson arrivals at 25/s, up to 12 `
      + 'open against a limit of 8 concurrent generations, 20% cancelled by the client after a random number of tokens, 20% with a 20–600 ms '
      + `deadline) and ${slow.sent} slow readers pausing 20–200 ms after every message; over the base and a rank-256 adapter.`;
    alongside.unshift(`with the ${stalledCount} readers stalled, the server's RSS grew ${rssGrowthMb} MB (buffering their files would take ${Math.round((stalledCount * want.length) / 2 ** 20)} MB) and it waited for 'drain' ${waitsStalled} times`);
    record('load', { ...figures, description, peakRssMb: Math.round(peak), stalled: { readers: stalledCount, rssGrowthMb, drainWaits: waits }, alongside });

    expect(figures.lost).toBe(0);
    expect(figures.hung).toBe(0);
    // Arrivals outrun the server on purpose (under the sanitizers most of all: 17% completed in the full
    // run): what it cannot take it refuses with a retryable status, and what it takes it finishes.
    expect(Object.keys(figures.failedByCode).filter((code) => !['RESOURCE_EXHAUSTED', 'DEADLINE_EXCEEDED', 'CANCELLED'].includes(code))).toEqual([]);
    expect(figures.completed).toBeGreaterThan(figures.sent / 10);
    expect(slow.completed).toBeGreaterThan(0);
    // Sixteen stalled 2.5 MB exports add 40 MB when buffered whole (39–40 MB measured with the server
    // changed to ignore 'drain'); honouring it, the server grew 15–16 MB (per-call state, the integrity
    // check's read buffers, code paths warming up). 28 MB sits between the two with room either side.
    expect(rssGrowthMb).toBeLessThan(28);
    expect(serve.stderr().match(SANITIZER_REPORT) ?? []).toEqual([]);
    expect(serve.lines.filter((l) => l.level === 'error' || Number(l.level) >= 50).map((l) => l.msg)).toEqual([]);
  }, 3_600_000);
});
