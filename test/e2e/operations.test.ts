// What a platform team sees of a real `tuneserve serve` process (bin/tuneserve.js over the small
// random model, real engine, API keys from a file, plaintext asked for explicitly), after real calls
// made with an API key and x-request-id metadata:
// - traces: an in-process OTLP/HTTP receiver (OTLP JSON, as a collector takes it) gets a SERVER span
//   per RPC carrying the request id, tenant and adapter, with child spans for adapter acquisition,
//   prefill and decode and for the training job; no span for health checks; no key or prompt text
//   in anything exported;
// - metrics: the Prometheus endpoint (--metrics-port) and the OTLP metrics both carry the metric names
//   and labels the dashboard uses (generation latency per adapter and tenant, training loss per job,
//   queue depth, KV blocks, device memory); every metric and label that a query of the Grafana
//   dashboard (deploy/grafana/tuneserve.json) names is in the scrape;
// - logs: pino JSON on stderr, each call's lines carrying its request id; no key or prompt text;
// - SIGTERM during a generation: the generation finishes whole (every token it was asked for), new
//   calls are refused while draining, the process exits 0, and the spans are flushed before it does.

import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import * as fs from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeModel } from '../../src/engine/make-model.js';
import { FinishReason, GenerateRequest, type GenerateResponse } from '../../src/gen/tuneserve/v1/generation.js';
import { TrainingConfig } from '../../src/gen/tuneserve/v1/training.js';
import { hashKey, newKey } from '../../src/server/auth.js';
import { createClients, type TuneClients } from '../../src/client/index.js';
import { ROOT } from '../helpers/dist.js';
import { startOtlpReceiver, type OtlpReceiver, type ReceivedSpan } from '../helpers/otlp-receiver.js';
import { freePort } from '../helpers/ports.js';
import { startServe, type ServeProcess } from '../helpers/serve-process.js';
import { call, collect, eventually, makeSandbox, upload } from '../server/harness.js';

const DATA = join(ROOT, 'data', 'memorize-20.jsonl');
const PROMPT_SECRET = 'SECRET-PROMPT-7f3a';
const SPAN_KIND_SERVER = 2;

const withRequestId = (id: string): Metadata => {
  const metadata = new Metadata();
  metadata.set('x-request-id', id);
  return metadata;
};

describe('operations of a real tuneserve serve process', () => {
  let sandbox = '';
  let key = '';
  let receiver: OtlpReceiver;
  let serve: ServeProcess;
  let metricsPort = 0;
  let clients: TuneClients;
  let echoedRequestId = '';

  beforeAll(async () => {
    sandbox = await makeSandbox();
    await makeModel({ preset: 'small', outDir: join(sandbox, 'model'), seed: 21 });
    key = newKey();
    await fs.writeFile(join(sandbox, 'keys.json'), JSON.stringify({ keys: [{ id: 'acme-app', sha256: hashKey(key), tenant: 'acme', scopes: ['generate', 'train'] }] }));
    receiver = await startOtlpReceiver();
    metricsPort = await freePort();
    serve = await startServe(
      ['--model', join(sandbox, 'model'), '--data-root', join(sandbox, 'data'), '--host', '127.0.0.1', '--plaintext',
        '--auth-keys-file', join(sandbox, 'keys.json'), '--metrics-port', String(metricsPort), '--metrics-host', '127.0.0.1',
        '--log-level', 'debug', '--threads', '2', '--grace-ms', '60000'],
      {
        OTEL_EXPORTER_OTLP_ENDPOINT: receiver.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
        OTEL_BSP_SCHEDULE_DELAY: '100',
        OTEL_METRICS_EXPORTER: 'otlp',
        OTEL_METRIC_EXPORT_INTERVAL: '500',
      },
    );
    clients = createClients(`127.0.0.1:${serve.port}`, { apiKey: key, plaintext: true });

    // The calls the checks below look at.
    await call(clients.model.getModelInfo, clients.model, {}, {}, withRequestId('req-info'));
    await upload(clients, 'memorize', await fs.readFile(DATA));
    const trained = await collect(
      clients.training.train(
        { jobId: 'ops-job', adapterId: 'ops-bot', datasetId: 'memorize', initAdapterId: '', detach: false,
          config: TrainingConfig.fromPartial({ maxSteps: 6, batchSize: 2, gradAccum: 1, learningRate: 1e-3, targetModules: ['q_proj', 'v_proj'], evalFraction: 0.2, evalEvery: 3 }) },
        withRequestId('req-train'),
      ),
    );
    expect(trained.error).toBeNull();
    const generation = clients.generation.generate(
      GenerateRequest.fromPartial({ text: `${PROMPT_SECRET} what is the codename?`, adapterId: 'ops-bot', maxTokens: 8, temperature: 0 }),
      withRequestId('req-gen-1'),
    );
    expect((await collect(generation)).error).toBeNull();
    // No x-request-id: the server makes one and sends it back in the response headers.
    const anonymous = clients.generation.generate(GenerateRequest.fromPartial({ text: 'base model', maxTokens: 4 }));
    anonymous.on('metadata', (metadata: Metadata) => (echoedRequestId = String(metadata.get('x-request-id')[0] ?? '')));
    expect((await collect(anonymous)).error).toBeNull();
    // A call without a key, refused.
    const keyless = createClients(`127.0.0.1:${serve.port}`, { plaintext: true });
    const refused = await call(keyless.model.getModelInfo, keyless.model, {}, {}, withRequestId('req-nokey')).then(() => null, (e: ServiceError) => e);
    expect(refused?.code).toBe(status.UNAUTHENTICATED);
    keyless.close();
    // A health check (it must not make a span).
    const { HealthClient } = await healthClient();
    await new Promise<void>((resolve, reject) =>
      new HealthClient(`127.0.0.1:${serve.port}`, credentials.createInsecure()).check({ service: '' }, (error: Error | null) => (error ? reject(error) : resolve())),
    );
  }, 600_000);

  afterAll(async () => {
    clients?.close();
    serve?.kill();
    await receiver?.close();
    if (sandbox) await fs.rm(sandbox, { recursive: true, force: true });
  });

  const spansNamed = (name: string): ReceivedSpan[] => receiver.spans.filter((s) => s.name === name);

  it('exports a span per RPC with request id, tenant and adapter, and child spans for generation phases and the job', async () => {
    // Spans arrive in batches (every 100 ms here): wait until each one looked at below is in.
    const arrived = (id: string) => receiver.spans.some((s) => s.attributes['tuneserve.request_id'] === id);
    await eventually(() => spansNamed('training.run').length > 0 && ['req-gen-1', 'req-train', 'req-nokey', echoedRequestId].every(arrived), 30_000);
    await eventually(() => spansNamed('generate.decode').length >= 2, 10_000);
    const generate = receiver.spans.find((s) => s.attributes['tuneserve.request_id'] === 'req-gen-1')!;
    expect(generate).toMatchObject({
      name: 'tuneserve.v1.GenerationService/Generate',
      kind: SPAN_KIND_SERVER,
      attributes: {
        'rpc.system': 'grpc', 'rpc.service': 'tuneserve.v1.GenerationService', 'rpc.method': 'Generate', 'rpc.grpc.status_code': 0,
        'tuneserve.tenant': 'acme', 'tuneserve.adapter': 'ops-bot', 'tuneserve.key_id': 'acme-app',
      },
    });
    expect(generate.resource['service.name']).toBe('tuneserve');
    // Children of that RPC span, in the same trace.
    const children = receiver.spans.filter((s) => s.parentSpanId === generate.spanId);
    expect(children.map((s) => s.name).sort()).toEqual(['generate.acquire_adapter', 'generate.decode', 'generate.prefill']);
    for (const child of children) expect(child).toMatchObject({ traceId: generate.traceId, attributes: { 'tuneserve.adapter': 'ops-bot', 'tuneserve.tenant': 'acme' } });

    // The Train call's span, and the job's spans under it.
    const train = receiver.spans.find((s) => s.attributes['tuneserve.request_id'] === 'req-train')!;
    expect(train).toMatchObject({ name: 'tuneserve.v1.TrainingService/Train', attributes: { 'tuneserve.job': 'ops-job', 'tuneserve.adapter': 'ops-bot' } });
    for (const name of ['training.queued', 'training.run']) {
      expect(spansNamed(name).find((s) => s.attributes['tuneserve.job'] === 'ops-job'), name).toMatchObject({
        traceId: train.traceId,
        parentSpanId: train.spanId,
        attributes: { 'tuneserve.adapter': 'ops-bot', 'tuneserve.tenant': 'acme' },
      });
    }
    expect(spansNamed('training.run')[0]!.attributes).toMatchObject({ 'tuneserve.job.state': 'succeeded', 'tuneserve.job.steps': 6 });

    // The refused call has its span, marked as an error; the generated request id is the one echoed back.
    const refused = receiver.spans.find((s) => s.attributes['tuneserve.request_id'] === 'req-nokey')!;
    expect(refused).toMatchObject({ name: 'tuneserve.v1.ModelService/GetModelInfo', attributes: { 'rpc.grpc.status_code': status.UNAUTHENTICATED } });
    expect(refused.status.code).toBe(2); // STATUS_CODE_ERROR
    expect(echoedRequestId).toMatch(/^[0-9a-f-]{36}$/);
    expect(receiver.spans.some((s) => s.attributes['tuneserve.request_id'] === echoedRequestId)).toBe(true);

    // No health-check spans; nothing exported holds the key or the prompt.
    expect(receiver.spans.filter((s) => s.name.includes('grpc.health'))).toEqual([]);
    for (const body of receiver.bodies) {
      expect(body).not.toContain(key);
      expect(body).not.toContain(PROMPT_SECRET);
    }
  });

  it('serves the metric names and labels on the Prometheus port and over OTLP', async () => {
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    // Generation metrics labelled with the adapter and the tenant.
    for (const name of ['gen_ai_server_request_duration', 'gen_ai_server_time_to_first_token', 'gen_ai_server_time_per_output_token', 'gen_ai_client_token_usage']) {
      expect(text, name).toMatch(new RegExp(`${name}_count\\{[^}]*tuneserve_adapter="ops-bot"[^}]*tuneserve_tenant="acme"`));
    }
    expect(text).toMatch(/rpc_server_call_duration_count\{[^}]*rpc_method="Train"[^}]*tuneserve_tenant="acme"/);
    // Training progress per job and adapter.
    for (const name of ['tuneserve_training_loss', 'tuneserve_training_learning_rate', 'tuneserve_training_tokens_per_second', 'tuneserve_training_step', 'tuneserve_training_eval_loss']) {
      expect(text, name).toMatch(new RegExp(`${name}\\{[^}]*tuneserve_job="ops-job"[^}]*\\} `));
    }
    expect(text).toMatch(/tuneserve_training_step\{[^}]*tuneserve_job="ops-job"[^}]*\} 6\b/);
    // Engine gauges: queue depth, KV blocks, device memory by use, the adapter pool.
    for (const name of ['tuneserve_training_jobs_queued', 'tuneserve_kv_cache_blocks', 'tuneserve_kv_cache_blocks_used', 'tuneserve_device_memory_total', 'tuneserve_device_memory_free', 'tuneserve_adapters_loaded', 'tuneserve_adapters_slots']) {
      expect(text, name).toMatch(new RegExp(`^${name}\\{[^}]*\\} \\d`, 'm'));
    }
    expect(text).toMatch(/tuneserve_device_memory_usage\{[^}]*tuneserve_memory_use="weights"[^}]*\} [1-9]/);
    expect(text).not.toContain(key);

    // OTLP metrics are exported every 500 ms; a later export holds what was recorded after an earlier one.
    await eventually(() => receiver.metrics.some((m) => m.name === 'tuneserve.training.loss' && m.points.some((p) => p['tuneserve.job'] === 'ops-job')), 10_000);
    await eventually(() => receiver.metrics.some((m) => m.name === 'gen_ai.server.request.duration' && m.points.some((p) => p['tuneserve.adapter'] === 'ops-bot')), 10_000);
  });

  it('exports every metric and label the Grafana dashboard (deploy/grafana/tuneserve.json) queries', async () => {
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    const dashboard = JSON.parse(await fs.readFile(join(ROOT, 'deploy', 'grafana', 'tuneserve.json'), 'utf8')) as {
      panels: { targets?: { expr: string }[] }[];
      templating: { list: { definition?: string }[] };
    };
    const expressions = [
      ...dashboard.panels.flatMap((panel) => (panel.targets ?? []).map((target) => target.expr)),
      ...dashboard.templating.list.flatMap((variable) => (variable.definition ? [variable.definition] : [])),
    ];
    expect(expressions.length).toBeGreaterThan(15);
    for (const expr of expressions) {
      const names = new Set(expr.match(/\b(?:gen_ai|rpc|tuneserve)_[a-z0-9_]+\b/g) ?? []);
      // Labels: inside by (...), left of a matcher in {...}, and label_values' second argument.
      const labels = new Set<string>([
        ...[...expr.matchAll(/by \(([^)]*)\)/g)].flatMap((m) => m[1]!.split(',').map((l) => l.trim())),
        ...[...expr.matchAll(/([a-z_]+)\s*(?:=~|!=|=)\s*"/g)].map((m) => m[1]!),
        ...[...expr.matchAll(/label_values\([^,]+,\s*([a-z_]+)\)/g)].map((m) => m[1]!),
      ]);
      const metrics = [...names].filter((name) => !labels.has(name));
      expect(metrics.length, expr).toBeGreaterThan(0);
      for (const metric of metrics) {
        const lines = text.split('\n').filter((line) => line.startsWith(`${metric}{`) || line.startsWith(`${metric} `));
        expect(lines.length, `${metric} (in ${expr}) is not exported`).toBeGreaterThan(0);
        for (const label of labels) {
          if (label === '') continue;
          expect(lines.some((line) => line.includes(`${label}="`)), `${metric} has no label ${label} (in ${expr})`).toBe(true);
        }
      }
    }
  });

  it('logs JSON lines with each call\'s request id, and no key or prompt text', () => {
    const genLines = serve.lines.filter((l) => l.requestId === 'req-gen-1');
    expect(genLines.length).toBeGreaterThan(0);
    expect(genLines.every((l) => l.rpc === 'GenerationService/Generate' && l.tenant === 'acme')).toBe(true);
    expect(serve.lines.find((l) => l.requestId === 'req-nokey')).toMatchObject({ msg: 'call failed', code: 'UNAUTHENTICATED' });
    expect(serve.lines.filter((l) => l.level === 'raw')).toEqual([]);
    expect(serve.stderr()).not.toContain(key);
    expect(serve.stderr()).not.toContain(PROMPT_SECRET);
  });

  it('SIGTERM during a generation: it finishes whole, new calls are refused, the process exits 0 after flushing spans', async () => {
    const maxTokens = 400;
    const stream = clients.generation.generate(
      GenerateRequest.fromPartial({ text: 'tell a long story', adapterId: 'ops-bot', maxTokens, temperature: 0, ignoreEos: true }),
      withRequestId('req-drain'),
    );
    const messages: GenerateResponse[] = [];
    const ended = new Promise<ServiceError | null>((resolve) => {
      stream.on('data', (m: GenerateResponse) => messages.push(m));
      stream.on('error', (e: ServiceError) => resolve(e));
      stream.on('end', () => resolve(null));
    });
    await eventually(() => messages.length > 0, 30_000);
    serve.child.kill('SIGTERM');
    await serve.waitFor((l) => l.msg === 'draining', 10_000);
    const late = await call(clients.model.getModelInfo, clients.model, {}, { deadline: new Date(Date.now() + 5000) }).then(() => null, (e: ServiceError) => e);
    expect(late?.code).toBe(status.UNAVAILABLE);
    expect(await ended).toBeNull();
    const last = messages.at(-1)!;
    expect(last.finishReason).toBe(FinishReason.FINISH_REASON_LENGTH);
    expect(last.usage?.completionTokens).toBe(maxTokens);
    // It was still generating when the drain began: the stream's end came after the "draining" line.
    expect(messages.length).toBeGreaterThan(1);
    expect(await serve.exited).toBe(0);
    expect(receiver.spans.some((s) => s.attributes['tuneserve.request_id'] === 'req-drain' && s.attributes['rpc.grpc.status_code'] === 0)).toBe(true);
  });
});

/** A grpc.health.v1 client class. */
async function healthClient(): Promise<{ HealthClient: new (address: string, creds: ReturnType<typeof credentials.createInsecure>) => { check(req: { service: string }, cb: (e: Error | null) => void): void } }> {
  const { makeClientConstructor } = await import('@grpc/grpc-js');
  const { service } = await import('grpc-health-check');
  return { HealthClient: makeClientConstructor(service, 'grpc.health.v1.Health') as never };
}
