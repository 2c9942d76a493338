// `tuneserve remote` against a real server (the real engine over a tiny random Llama 3 model on
// 127.0.0.1): adapters list, a 3-step train with the JSON event stream and with the progress
// readout, generate --json, jobs get, merge, export/import, and failures printed as one line with
// the gRPC status name, the ErrorInfo reason and the field violations: in-process through
// remoteCommand, and once through bin/tuneserve.js for the exit code.

import { Metadata, status } from '@grpc/grpc-js';
import { execFile } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { describeCallError, remoteCommand } from '../../src/cli/remote-command.js';
import { encodeStatusDetails, STATUS_DETAILS_KEY } from '../../src/server/status-details.js';
import { ensureDistFresh } from '../helpers/dist.js';
import { startRealServer, type RealServer } from '../helpers/real-server.js';

const ROOT = join(import.meta.dirname, '..', '..');
const DATA = join(ROOT, 'data', 'memorize-20.jsonl');
const run = promisify(execFile);

interface Ran {
  stdout: string;
  stderr: string;
  error: (Error & { code?: string }) | null;
}

describe('tuneserve remote', () => {
  let real: RealServer;
  let address: string;

  beforeAll(async () => {
    real = await startRealServer({ preset: 'tiny', seed: 5 });
    address = real.address;
  }, 300_000);

  afterAll(async () => {
    await real?.dispose();
  });

  /** Runs `tuneserve remote <args> --addr <server>` in-process, capturing what it writes. */
  async function remote(...args: string[]): Promise<Ran> {
    const stdout = new PassThrough();
    const stderr = new PassThrough();
    const chunks = { stdout: [] as Buffer[], stderr: [] as Buffer[] };
    stdout.on('data', (chunk: Buffer) => chunks.stdout.push(chunk));
    stderr.on('data', (chunk: Buffer) => chunks.stderr.push(chunk));
    let error: Ran['error'] = null;
    try {
      await remoteCommand([...args, '--addr', address, '--plaintext'], { stdout, stderr });
    } catch (caught) {
      error = caught as Ran['error'];
    }
    return { stdout: Buffer.concat(chunks.stdout).toString(), stderr: Buffer.concat(chunks.stderr).toString(), error };
  }

  it('lists no adapters on a fresh server', async () => {
    const { stdout, error } = await remote('adapters', 'list');
    expect(error).toBeNull();
    expect(stdout).toBe('no adapters\n');
  });

  it('trains for 3 steps: uploads the file, streams one JSON object per event, the adapter appears', async () => {
    const { stdout, error } = await remote('train', '--dataset-file', DATA, '--adapter-id', 'cli-mem', '--job-id', 'cli-job-1',
      '--steps', '3', '--batch-size', '4', '--grad-accum', '1', '--lr', '2e-3', '--targets', 'all-linear', '--dropout', '0', '--json');
    expect(error).toBeNull();
    const events = stdout.trim().split('\n').map((line) => JSON.parse(line) as Record<string, { step?: number } | string | number>);
    const kinds = events.map((event) => ['queued', 'datasetReport', 'started', 'step', 'completed'].find((kind) => kind in event));
    expect(kinds).toEqual(['queued', 'datasetReport', 'started', 'step', 'step', 'step', 'completed']);
    expect(events.every((event) => event.jobId === 'cli-job-1')).toBe(true);
    expect(events.filter((event) => 'step' in event).map((event) => (event.step as { step: number }).step)).toEqual([1, 2, 3]);

    const listed = await remote('adapters', 'list');
    expect(listed.stdout.split('\n')[0]).toMatch(/^ADAPTER\s+LOADED\s+FITS BASE\s+RANK/);
    // Loaded: a finished job's adapter stays in the pool and serves from there (train-to-serve).
    expect(listed.stdout).toMatch(/^cli-mem\s+yes\s+yes\s+16\s+32\s+q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj\s+trained/m);
  }, 120_000);

  it('trains with the progress readout and reuses the uploaded dataset', async () => {
    const { stdout, stderr, error } = await remote('train', '--dataset-file', DATA, '--adapter-id', 'cli-mem-2', '--steps', '2', '--grad-accum', '1');
    expect(error).toBeNull();
    expect(stderr).toMatch(/^reusing dataset memorize-20-[0-9a-f]{8} \(20 rows/m);
    expect(stderr).toMatch(/started: 2 steps over 20 examples/);
    expect(stderr).toMatch(/\] 1\/2 loss \d+\.\d{4}\s+lr 2\.00e-4 .*\n.*\] 2\/2 loss \d+\.\d{4}\s+lr 1\.00e-4 /); // the server's defaults: 2e-4, linear decay
    expect(stdout).toMatch(/^adapter "cli-mem-2" trained by job \S+: 2 steps, loss \d+\.\d{4} → \d+\.\d{4}, \d+ tokens/);
  }, 120_000);

  it('generate --json prints one object with the text, token ids, finish reason and usage', async () => {
    const { stdout, error } = await remote('generate', '--adapter', 'cli-mem', '--prompt', 'Q: What is the codename of project 7?', '--max-tokens', '6', '--ignore-eos', '--json');
    expect(error).toBeNull();
    const result = JSON.parse(stdout) as { text: string; tokenIds: number[]; finishReason: string; usage: { promptTokens: number; completionTokens: number }; adapterId: string };
    expect(result).toMatchObject({ finishReason: 'length', adapterId: 'cli-mem', usage: { completionTokens: 6 } });
    expect(result.tokenIds).toHaveLength(6);
    expect(result.usage.promptTokens).toBeGreaterThan(5);
    expect(typeof result.text).toBe('string');
  }, 60_000);

  it('jobs get --history, merge, and an export/import round trip', async () => {
    const job = await remote('jobs', 'get', 'cli-job-1', '--history');
    expect(job.error).toBeNull();
    expect(job.stdout).toMatch(/^state\s+succeeded$/m);
    expect(job.stdout).toMatch(/^STEP\s+EPOCH\s+LOSS/m);

    const merged = await remote('merge', '--adapter', 'cli-mem', '--out-name', 'cli-merged', '--dtype', 'f32');
    expect(merged.error).toBeNull();
    expect(merged.stdout).toMatch(/^merged into export folder "cli-merged": [\d.]+ MB, \d+ tensors/);
    expect(merged.stdout).toMatch(/top-1 agreement [\d.]+%/);

    const folder = join(real.sandbox, 'exported');
    expect((await remote('adapters', 'export', 'cli-mem', folder)).error).toBeNull();
    expect((await readdir(folder)).sort()).toEqual(['adapter_config.json', 'adapter_model.safetensors']);
    const imported = await remote('adapters', 'import', 'cli-copy', folder);
    expect(imported.error).toBeNull();
    expect(imported.stdout).toMatch(/^imported adapter "cli-copy"/);
  }, 120_000);

  it('jobs resume continues a cancelled job from its checkpoint and refuses a succeeded one', async () => {
    const started = await remote('train', '--dataset-file', DATA, '--adapter-id', 'cli-resumed', '--job-id', 'cli-resume-1', '--steps', '200',
      '--checkpoint-every', '5', '--detach');
    expect(started.error).toBeNull();
    // Cancel once a checkpoint exists: the job keeps its checkpoints because it did not succeed.
    for (let i = 0; ; i++) {
      const got = await remote('jobs', 'get', 'cli-resume-1', '--json');
      if ((JSON.parse(got.stdout) as { job: { lastCheckpointStep?: number } }).job.lastCheckpointStep) break;
      if (i > 600) throw new Error('no checkpoint');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    expect((await remote('jobs', 'cancel', 'cli-resume-1')).error).toBeNull();
    for (let i = 0; ; i++) {
      const got = await remote('jobs', 'get', 'cli-resume-1');
      if (/^state\s+cancelled$/m.test(got.stdout)) break;
      if (i > 600) throw new Error('not cancelled');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const resumed = await remote('jobs', 'resume', 'cli-resume-1');
    expect(resumed.error).toBeNull();
    expect(resumed.stdout).toMatch(/^job cli-resume-1: (queued|running) again from its checkpoint at step [1-9]\d*;/);
    const watched = await remote('jobs', 'watch', 'cli-resume-1', '--json');
    expect(watched.error).toBeNull();
    expect(watched.stdout).toMatch(/"resumed"/);

    const refused = await remote('jobs', 'resume', 'cli-resume-1');
    expect(refused.error?.code).toBe('FAILED_PRECONDITION');
    expect(refused.error?.message).toMatch(/^JOB_NOT_RESUMABLE: /);
  }, 300_000);

  it('fails with the status name, the ErrorInfo reason and the field violations', async () => {
    const missing = await remote('generate', '--adapter', 'nope', '--prompt', 'hello');
    expect(missing.error?.code).toBe('NOT_FOUND');
    expect(missing.error?.message).toBe('ADAPTER_NOT_FOUND: adapter "nope" not found');

    const invalid = await remote('train', '--dataset-file', DATA, '--adapter-id', 'x', '--lr', '5');
    expect(invalid.error?.code).toBe('INVALID_ARGUMENT');
    expect(invalid.error?.message).toBe('INVALID_ARGUMENT: config.learning_rate must be above 0 and at most 1, got 5');

    // Every field violation the message does not spell out, and the retry hint.
    const metadata = new Metadata();
    metadata.set(STATUS_DETAILS_KEY, encodeStatusDetails({
      code: status.RESOURCE_EXHAUSTED, message: 'the queue is full', reason: 'QUEUE_FULL', domain: 'tuneserve.dev', metadata: {},
      fieldViolations: [{ field: 'config.rank', description: 'must be 1 to 256' }, { field: 'adapter_id', description: 'is empty' }], retryAfterMs: 2500,
    }));
    const error = Object.assign(new Error('8 RESOURCE_EXHAUSTED: the queue is full'), { code: status.RESOURCE_EXHAUSTED, details: 'the queue is full', metadata });
    expect(describeCallError(error as never)).toBe('QUEUE_FULL: the queue is full [config.rank: must be 1 to 256; adapter_id: is empty] (retry in 2.5 s)');
  });

  it('exits 1 with one error line from bin/tuneserve.js', async () => {
    await ensureDistFresh();
    const failed = await run(process.execPath, [join(ROOT, 'bin', 'tuneserve.js'), 'remote', 'adapters', 'get', 'nope', '--addr', address, '--plaintext'], { cwd: ROOT })
      .then(() => null, (error: unknown) => error as { code: number; stdout: string; stderr: string });
    expect(failed?.code).toBe(1);
    expect(failed?.stderr).toBe('tuneserve remote: [NOT_FOUND] ADAPTER_NOT_FOUND: adapter "nope" not found\n');
  }, 180_000);
});
