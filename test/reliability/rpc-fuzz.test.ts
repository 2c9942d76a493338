// Fuzzing of every RPC of a real `tuneserve serve` process (tiny model, CPU, plaintext on 127.0.0.1):
// requests with random and extreme field values (ids that are hostile, empty or 100k long; numbers
// negative, NaN, infinite, beyond uint32; enum values that do not exist; control-token text; prompts
// and inline datasets of random rows), sent as bytes through a raw grpc-js client so that some are
// then damaged on the wire: bits flipped (strings that are not UTF-8 among them), cut short, garbage
// appended, or grown past the 4 MiB message limit. Then the chunk streams of uploads and imports:
// chunks out of order, missing, repeated, for files the manifest does not name, wrong sizes and
// checksums, a header twice or never, a client that cancels mid-stream.
// Every call must end with a status within its deadline: OK or a code that names the problem. A
// crash (the process dies, UNAVAILABLE), an unknown failure (INTERNAL from the service, or an
// error-level log line) or a call left without an answer fails the suite; at the end the server
// still answers, and nothing half-received is visible in the data root.

import * as grpc from '@grpc/grpc-js';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { createClients, importAdapterFolder, uploadDatasetFile, type TuneClients } from '../../src/client/index.js';
import { Engine } from '../../src/engine/engine.js';
import { makeModel } from '../../src/engine/make-model.js';
import { createLoraConfig } from '../../src/engine/peft-config.js';
import { AdapterServiceService, ImportAdapterRequest } from '../../src/gen/tuneserve/v1/adapters.js';
import { DatasetServiceService, UploadDatasetRequest } from '../../src/gen/tuneserve/v1/datasets.js';
import { GenerationServiceService } from '../../src/gen/tuneserve/v1/generation.js';
import { ModelServiceService } from '../../src/gen/tuneserve/v1/model.js';
import { TrainingConfig, TrainingServiceService } from '../../src/gen/tuneserve/v1/training.js';
import { statusDetailsOf } from '../../src/server/status-details.js';
import { fuzz, record } from '../helpers/fuzz.js';
import type { Random } from '../helpers/random.js';
import { inheritedSanitizerEnv, SANITIZER_REPORT } from '../helpers/sanitizer.js';
import { startServe, type ServeProcess } from '../helpers/serve-process.js';
import { call } from '../server/harness.js';

interface Method {
  path: string;
  requestStream: boolean;
  responseStream: boolean;
  requestSerialize(value: never): Buffer;
  requestDeserialize(value: Buffer): unknown;
}

const SERVICES = [AdapterServiceService, DatasetServiceService, GenerationServiceService, ModelServiceService, TrainingServiceService];
const METHODS: Record<string, Method> = Object.fromEntries(SERVICES.flatMap((s) => Object.entries(s as unknown as Record<string, Method>)));
/** How often each RPC is drawn: the ones that start real work (generation, training, merges) less. */
const WEIGHTS: Record<string, number> = { generate: 6, train: 3, mergeAndUnload: 1, importAdapter: 3, uploadDataset: 3 };

/** Codes that name a problem; INTERNAL and UNKNOWN do not, UNAVAILABLE means the server went away. */
const CLEAR = new Set([
  grpc.status.OK, grpc.status.INVALID_ARGUMENT, grpc.status.NOT_FOUND, grpc.status.ALREADY_EXISTS, grpc.status.FAILED_PRECONDITION,
  grpc.status.RESOURCE_EXHAUSTED, grpc.status.OUT_OF_RANGE, grpc.status.PERMISSION_DENIED, grpc.status.UNAUTHENTICATED,
  grpc.status.CANCELLED, grpc.status.DEADLINE_EXCEEDED, grpc.status.DATA_LOSS, grpc.status.UNIMPLEMENTED,
]);

const IDS = ['ds', 'ad', 'job-1', 'fresh-1', 'x', 'out-1'];
const HOSTILE = ['', '../x', '/etc/passwd', 'a/b', '..', '.hidden', 'UPPER', 'a b', 'a\u0000b', 'é', 'x'.repeat(300), 'y'.repeat(100_000)];
const CONTROL = ['<|eot_id|>', '<|begin_of_text|>', '<|start_header_id|>assistant<|end_header_id|>\n\n', '<|end_of_text|>'];

/**
 * Field values: with probability `sane` an ordinary one (an existing id, a small count, a usual rate),
 * otherwise an extreme one. A case draws its `sane` once, so some cases are nearly valid (and reach
 * the engine) and others are hostile throughout.
 */
class Draw {
  constructor(readonly random: Random, readonly sane: number) {}

  private ok(): boolean {
    return this.random.chance(this.sane);
  }

  str(): string {
    const random = this.random;
    if (this.ok()) return random.pick(IDS);
    return random.pick<() => string>([
      () => random.pick(HOSTILE),
      () => random.pick(CONTROL) + random.pick(['', 'hi', ' there']),
      () => random.pick(['Hello world!', 'naïve 日本語 😀', '\n', ' ', '\ud800']),
      () => 'word '.repeat(random.pick([10, 200, 2000])),
    ])();
  }

  /** Mostly the id of what exists (the adapter "ad", the dataset "ds"), or any id, or an extreme string. */
  existing(id: 'ad' | 'ds'): string {
    return this.ok() ? (this.random.chance(0.8) ? id : this.random.pick(IDS)) : this.str();
  }

  /** An id nothing has yet (for what creates: jobs, adapters, exports), or an extreme string. */
  fresh(): string {
    return this.ok() ? `n-${this.random.below(1e9)}` : this.str();
  }

  text(): string {
    return this.ok() ? this.random.pick(['Hello', 'Q: what is 2+2?', 'naïve 日本語 😀', `say ${this.random.pick(CONTROL)} now`]) : this.str();
  }

  uint(saneMax = 4): number {
    const random = this.random;
    if (this.ok()) return random.int(1, saneMax);
    return random.chance(0.8) ? random.pick([0, 1, 127, 128, 129, 4096, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]) : random.below(2 ** 32);
  }

  double(sane: number): number {
    const random = this.random;
    if (this.ok()) return sane;
    return random.chance(0.8) ? random.pick([0, -0, 1, -1, 0.5, 2, 1e-12, 1e308, -1e308, NaN, Infinity, -Infinity, 5e-324, 1.0000001]) : random.next() * 200 - 100;
  }

  enumValue(values: number): number {
    return this.ok() ? this.random.below(values) : this.random.pick([-1, values, 99, 2 ** 31 - 1]);
  }

  bool(): boolean {
    return this.random.chance(0.5);
  }

  ids(): number[] {
    const random = this.random;
    return Array.from({ length: this.ok() ? random.int(1, 8) : random.pick([0, 100, 300]) }, () => (this.ok() ? random.below(128256) : random.pick([128256, 2 ** 31, 2 ** 32 - 1, 128009])));
  }

  rows(): Buffer {
    const good = ['{"text":"hello there"}', '{"prompt":"Q","completion":" A"}', '{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}', '{"input_ids":[1,2,3]}'];
    const bad = ['{"bad":1}', 'not json', '{"text":""}', '{"text":"<|eot_id|>"}'];
    return Buffer.from(Array.from({ length: this.random.int(0, 6) }, () => this.random.pick(this.ok() ? good : bad)).join(this.random.pick(['\n', '\r\n'])));
  }
}

function trainingConfig(d: Draw): Record<string, unknown> {
  const random = d.random;
  return {
    rank: d.uint(4), alpha: d.double(8), dropout: random.chance(0.5) ? d.double(0.05) : undefined,
    targetModules: random.chance(0.8) ? [random.pick(['q_proj', 'v_proj', 'all-linear', 'lm_head', '', 'x'])] : [],
    learningRate: d.double(1e-3), maxSteps: d.uint(2), epochs: d.uint(1), batchSize: d.uint(2), gradAccum: d.uint(1), maxSeqLen: d.uint(64),
    scheduler: d.enumValue(3), warmupSteps: d.uint(1) - 1, weightDecay: d.double(0), maxGradNorm: random.chance(0.5) ? d.double(1) : undefined,
    seed: d.uint(100), shuffle: random.chance(0.5) ? d.bool() : undefined, evalFraction: d.double(0), evalEvery: d.uint(1) - 1,
    checkpointEvery: d.uint(1) - 1, nonfinitePolicy: d.enumValue(4), spikeFactor: d.double(0), spikePolicy: d.enumValue(4),
    earlyStoppingPatience: d.uint(1) - 1, earlyStoppingMinDelta: d.double(0), keepBest: random.chance(0.2),
    forgettingCheck: random.chance(0.05), forgettingWarnThreshold: d.double(0.5),
  };
}

/** A typed request of random and extreme field values for one RPC. */
function request(name: string, d: Draw): Record<string, unknown> {
  const random = d.random;
  const id = () => d.str();
  switch (name) {
    case 'listAdapters': return { pageSize: d.uint(10), pageToken: random.chance(0.7) ? '' : id(), loadedOnly: d.bool() };
    case 'listDatasets': return { pageSize: d.uint(10), pageToken: random.chance(0.7) ? '' : id() };
    case 'listJobs': return { pageSize: d.uint(10), pageToken: random.chance(0.7) ? '' : id(), states: Array.from({ length: random.int(0, 3) }, () => d.enumValue(7)) };
    case 'getAdapter': case 'deleteAdapter': return { adapterId: d.existing('ad') };
    case 'loadAdapter': case 'unloadAdapter': return { adapterId: random.pick([d.existing('ad'), 'ad@v1', 'ad@prod', 'ad@v0', 'ad@v99', 'ad@'] ) };
    case 'setAdapterShared': return { adapterId: d.existing('ad'), shared: d.bool() };
    case 'setAdapterAlias': return { adapterId: d.existing('ad'), alias: random.pick(['prod', 'latest', 'v1', 'a.b', d.str()]), version: d.uint(2) };
    case 'rollbackAdapterAlias': case 'deleteAdapterAlias': return { adapterId: d.existing('ad'), alias: random.pick(['prod', 'latest', d.str()]) };
    case 'pinAdapter': return { adapterId: random.pick([d.existing('ad'), 'ad@v1', 'ad@prod', 'ad@v99']), pinned: d.bool() };
    case 'exportAdapter': return { adapterId: d.existing('ad'), chunkSize: d.uint(65536) };
    case 'mergeAndUnload': return { adapterId: d.existing('ad'), outputName: d.fresh(), dtype: d.enumValue(4), base: d.enumValue(3), unloadAdapter: d.bool() };
    case 'getDataset': case 'deleteDataset': return { datasetId: d.existing('ds') };
    case 'getModelInfo': return {};
    case 'getJob': return { jobId: id(), includeHistory: d.bool() };
    case 'watchJob': return { jobId: id(), afterSequence: d.uint(3) };
    case 'cancelJob': case 'resumeJob': return { jobId: id() };
    case 'train': return {
      jobId: d.fresh(), adapterId: random.chance(0.8) ? d.fresh() : d.existing('ad'), initAdapterId: random.chance(0.7) ? '' : d.existing('ad'), detach: random.chance(0.7), newVersion: random.chance(0.2),
      ...(random.chance(0.6) ? { datasetId: d.existing('ds') } : { inlineJsonl: d.rows() }), ...(random.chance(0.9) ? { config: TrainingConfig.fromPartial(trainingConfig(d)) } : {}),
    };
    case 'generate': {
      const prompt = random.below(4);
      return {
        ...(prompt === 0 ? { text: d.text() } : prompt === 1 ? { chat: { messages: Array.from({ length: d.uint(3) % 600 }, () => ({ role: random.pick(['user', 'assistant', 'system', 'tool', 'x', '']), content: d.text() })) } } : prompt === 2 ? { tokenIds: { ids: d.ids() } } : {}),
        adapterId: random.chance(0.6) ? '' : d.existing('ad'), maxTokens: d.uint(8),
        temperature: random.chance(0.5) ? d.double(0.7) : undefined, topK: d.uint(40) - 1, topP: random.chance(0.5) ? d.double(0.9) : undefined,
        repetitionPenalty: random.chance(0.5) ? d.double(1.1) : undefined, seed: random.chance(0.5) ? d.uint(1000) : undefined,
        stopSequences: Array.from({ length: random.pick([0, 0, 1, 9]) }, () => d.text()), ignoreEos: random.chance(0.3), returnTokenIds: d.bool(),
      };
    }
    case 'uploadDataset': return { header: { datasetId: id(), sizeBytes: d.uint(100), sha256: random.chance(0.5) ? 'a'.repeat(64) : id(), shared: d.bool() } };
    case 'importAdapter': return { header: { adapterId: id(), newVersion: random.chance(0.2), files: Array.from({ length: random.int(0, 4) }, () => ({ name: random.pick(['adapter_config.json', 'adapter_model.safetensors', 'README.md', id()]), sizeBytes: d.uint(100), sha256: random.chance(0.5) ? 'b'.repeat(64) : id() })), shared: d.bool() } };
    default: throw new Error(`no generator for ${name}`);
  }
}

/** Serialises a request; values the encoder refuses (a NaN in a uint32) are replaced and retried. */
function encode(method: Method, value: Record<string, unknown>): Buffer {
  try {
    return method.requestSerialize(value as never);
  } catch {
    // Every number a uint32 field could refuse becomes 1; bytes, strings and structure stay.
    const clean = (v: unknown): unknown => {
      if (typeof v === 'number') return Number.isInteger(v) && v >= 0 && v < 2 ** 32 ? v : 1;
      if (Array.isArray(v)) return v.map(clean);
      if (v !== null && typeof v === 'object' && !(v instanceof Uint8Array)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, clean(x)]));
      return v;
    };
    return method.requestSerialize(clean(value) as never);
  }
}

/** Damage on the wire: flipped bits, a cut, garbage appended, or growth past the 4 MiB limit. */
function damage(random: Random, bytes: Buffer): { bytes: Buffer; what: string } {
  const copy = Buffer.from(bytes);
  switch (random.below(4)) {
    case 0:
      for (let i = 0, n = random.int(1, 4); i < n && copy.length > 0; i++) {
        const at = random.below(copy.length);
        copy[at] = copy[at]! ^ (1 << random.below(8));
      }
      return { bytes: copy, what: 'bits flipped' };
    case 1: return { bytes: copy.subarray(0, random.below(copy.length + 1)), what: 'cut short' };
    case 2: return { bytes: Buffer.concat([copy, random.bytes(random.int(1, 40))]), what: 'garbage appended' };
    default: return { bytes: Buffer.concat([copy, Buffer.from([0x7a, 0x80, 0x80, 0x80, 0x03]), Buffer.alloc(6 * 1024 * 1024, 1)]), what: 'a 6 MiB field appended' }; // field 15, bytes
  }
}

interface Outcome { code: number; details: string; reason: string | null; messages: number }

function outcomeOf(error: grpc.ServiceError | null, messages: number): Outcome {
  if (error === null) return { code: grpc.status.OK, details: '', reason: null, messages };
  return { code: error.code, details: error.details, reason: statusDetailsOf(error)?.reason ?? null, messages };
}

describe('RPCs of a real serve process under fuzzing', () => {
  let sandbox: string;
  let serve: ServeProcess;
  let raw: grpc.Client;
  let clients: TuneClients;
  const deadlineMs = 20_000;

  beforeAll(async () => {
    sandbox = await mkdtemp(join(tmpdir(), 'tuneserve-rpc-fuzz-'));
    await makeModel({ preset: 'tiny', outDir: join(sandbox, 'model'), seed: 4 });
    const engine = await Engine.load(join(sandbox, 'model'), { device: 'cpu', quant: 'nf4', maxSeqLen: 32, log: () => {} });
    try {
      await engine.saveAdapter(engine.createAdapter(createLoraConfig({ r: 2, alpha: 4, targets: ['q_proj', 'v_proj'] }), 1), join(sandbox, 'adapter'));
    } finally {
      engine.close();
    }
    serve = await startServe(['--model', join(sandbox, 'model'), '--data-root', join(sandbox, 'data'), '--host', '127.0.0.1', '--plaintext', '--device', 'cpu',
      '--threads', '1', '--max-seq-len', '128', '--max-queued-jobs', '4', '--max-concurrent-generations', '8'], inheritedSanitizerEnv());
    clients = createClients(`127.0.0.1:${serve.port}`, { plaintext: true });
    raw = new grpc.Client(`127.0.0.1:${serve.port}`, grpc.credentials.createInsecure());
    // Something to find: a dataset and an adapter under ids the generators draw.
    const rowsFile = join(sandbox, 'rows.jsonl');
    await writeFile(rowsFile, '{"prompt":"Q: 1?","completion":" A: 1."}\n{"text":"hello"}\n');
    await uploadDatasetFile(clients, 'ds', rowsFile);
    await importAdapterFolder(clients, 'ad', join(sandbox, 'adapter'));
  }, 300_000);

  afterAll(async () => {
    clients?.close();
    raw?.close();
    serve?.kill();
    if (serve) await serve.exited;
    if (sandbox) await rm(sandbox, { recursive: true, force: true });
  });

  /** Sends bytes to a method and waits for the end of the call (every message of a stream read). */
  function send(path: string, method: Method, payloads: Buffer[], options: { cancelAfterMs?: number } = {}): Promise<Outcome> {
    const identity = (b: Buffer): Buffer => b;
    const callOptions = { deadline: Date.now() + deadlineMs };
    return new Promise((resolve) => {
      if (!method.requestStream && !method.responseStream) {
        raw.makeUnaryRequest(path, identity, identity, payloads[0]!, new grpc.Metadata(), callOptions, (error) => resolve(outcomeOf(error, 0)));
      } else if (!method.requestStream) {
        const call = raw.makeServerStreamRequest(path, identity, identity, payloads[0]!, new grpc.Metadata(), callOptions);
        let messages = 0;
        call.on('data', () => messages++);
        call.on('error', (error: grpc.ServiceError) => resolve(outcomeOf(error, messages)));
        call.on('end', () => resolve(outcomeOf(null, messages)));
        if (options.cancelAfterMs !== undefined) setTimeout(() => call.cancel(), options.cancelAfterMs);
      } else {
        const call = raw.makeClientStreamRequest(path, identity, identity, new grpc.Metadata(), callOptions, (error) => resolve(outcomeOf(error, 0)));
        for (const payload of payloads) call.write(payload);
        if (options.cancelAfterMs !== undefined) setTimeout(() => call.cancel(), options.cancelAfterMs);
        else call.end();
      }
    });
  }

  /** A clear status is a code that names the problem; INTERNAL only as grpc-js's own parse failure. */
  function clearCode(outcome: Outcome): string | null {
    if (CLEAR.has(outcome.code)) return grpc.status[outcome.code]!;
    if (outcome.code === grpc.status.INTERNAL && outcome.reason === null && /deserializ|parse/i.test(outcome.details)) return 'INTERNAL (malformed message)';
    return null;
  }

  it('every RPC, random and extreme fields, some damaged on the wire: a status for every call', async () => {
    const names = Object.keys(METHODS).flatMap((name) => Array<string>(WEIGHTS[name] ?? 2).fill(name));
    const summary = await fuzz({
      name: 'RPC requests, every method (random/extreme fields, damaged bytes, oversize)', id: 'rpc', seed: 41,
      cases: { bounded: 300, full: 2500 }, caseTimeoutMs: deadlineMs + 15_000,
      make: (random) => {
        const name = random.pick(names);
        const method = METHODS[name]!;
        const d = new Draw(random, random.pick([1, 0.95, 0.7, 0.3]));
        const value = request(name, d);
        let payload = encode(method, value);
        let what = `${name} ${JSON.stringify(value, (_k, v: unknown) => (typeof v === 'string' && v.length > 60 ? `${v.slice(0, 20)}…(${v.length})` : v)).slice(0, 300)}`;
        if (random.chance(0.25)) {
          const damaged = damage(random, payload);
          payload = damaged.bytes;
          what += ` [${damaged.what}]`;
        }
        const payloads = [payload];
        if (method.requestStream) {
          for (let i = 0, n = random.int(0, 3); i < n; i++) {
            payloads.push(name === 'uploadDataset' ? Buffer.from(UploadDatasetRequest.encode({ chunk: d.rows() }).finish())
              : Buffer.from(ImportAdapterRequest.encode({ chunk: { name: random.pick(['adapter_config.json', 'adapter_model.safetensors', d.str()]), data: random.bytes(random.int(0, 64)) } }).finish()));
          }
        }
        return { name, method, value, payloads, what, jobId: typeof value.jobId === 'string' ? value.jobId : null };
      },
      describe: (c) => c.what,
      clearError: (error) => (error as { code?: string }).code ?? null,
      run: async (c) => {
        const outcome = await send(c.method.path, c.method, c.payloads);
        // Jobs a Train created keep running on the server: cancel them so the queue stays short.
        if (c.name === 'train' && c.jobId !== null) await send(TrainingServiceService.cancelJob.path, METHODS.cancelJob!, [encode(METHODS.cancelJob!, { jobId: c.jobId })]);
        if (serve.child.exitCode !== null) return { failure: `the server exited (${serve.child.exitCode})` };
        const code = clearCode(outcome);
        if (code === null) return { failure: `answered ${grpc.status[outcome.code]} (${outcome.reason ?? 'no reason'}): ${outcome.details}` };
        if (code === 'OK') {
          // Keep something to find under the ids the generators draw.
          if (c.name === 'deleteAdapter' && c.value.adapterId === 'ad') await importAdapterFolder(clients, 'ad', join(sandbox, 'adapter'));
          if (c.name === 'deleteDataset' && c.value.datasetId === 'ds') await uploadDatasetFile(clients, 'ds', join(sandbox, 'rows.jsonl'));
          return 'accepted';
        }
        throw Object.assign(new Error(outcome.details), { code });
      },
    });
    expect(summary.crashes).toEqual([]);
    expect(summary.hangs).toEqual([]);
    expect(summary.accepted).toBeGreaterThan(summary.cases / 20);
  }, 3_600_000);

  it('chunk streams: out of order, missing, repeated, unnamed, wrong sizes and checksums, cancelled; nothing half-received is ever visible', async () => {
    const adapterFiles: Record<string, Buffer> = {
      'adapter_config.json': await readFile(join(sandbox, 'adapter', 'adapter_config.json')),
      'adapter_model.safetensors': await readFile(join(sandbox, 'adapter', 'adapter_model.safetensors')),
    };
    const dataset = Buffer.from(Array.from({ length: 40 }, (_, i) => JSON.stringify({ prompt: `Q${i}`, completion: ` A${i}` })).join('\n'));
    const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    const chunksOf = (b: Buffer, size: number) => Array.from({ length: Math.ceil(b.length / size) }, (_, i) => b.subarray(i * size, (i + 1) * size));
    const MANIPULATIONS = ['none', 'reorder', 'drop', 'repeat', 'unnamed', 'short size', 'long size', 'wrong sha', 'header twice', 'no header', 'header only', 'oversize chunk', 'cancel', 'interleave'] as const;
    let fresh = 0;
    const summary = await fuzz({
      name: 'upload and import chunk streams (order, gaps, repeats, sizes, checksums, cancels)', id: 'chunk-streams', seed: 42,
      cases: { bounded: 150, full: 1200 },
      make: (random) => ({ kind: random.pick(['dataset', 'adapter'] as const), manipulation: random.pick(MANIPULATIONS), chunkSize: random.pick([1, 7, 100, 4096, 65536]), random }),
      describe: (c) => `${c.kind}: ${c.manipulation}, chunks of ${c.chunkSize}`,
      clearError: (error) => (error as { code?: string }).code ?? null,
      run: async (c) => {
        const { random, manipulation } = c;
        const id = `f-${++fresh}`;
        const files: Record<string, Buffer> = c.kind === 'dataset' ? { data: dataset } : adapterFiles;
        const entries = Object.entries(files).map(([name, bytes]) => ({ name, bytes, declared: bytes.length, sha: sha(bytes) }));
        const target = random.pick(entries);
        if (manipulation === 'short size') target.declared -= random.int(1, Math.min(10, target.bytes.length - 1));
        if (manipulation === 'long size') target.declared += random.int(1, 1000);
        if (manipulation === 'wrong sha') target.sha = sha(Buffer.from('other'));
        const header = c.kind === 'dataset'
          ? Buffer.from(UploadDatasetRequest.encode({ header: { datasetId: id, sizeBytes: entries[0]!.declared, sha256: entries[0]!.sha, shared: false } }).finish())
          : Buffer.from(ImportAdapterRequest.encode({ header: { adapterId: id, files: entries.map((e) => ({ name: e.name, sizeBytes: e.declared, sha256: e.sha })), shared: false } }).finish());
        const chunk = (name: string, data: Buffer) => (c.kind === 'dataset' ? Buffer.from(UploadDatasetRequest.encode({ chunk: data }).finish()) : Buffer.from(ImportAdapterRequest.encode({ chunk: { name, data } }).finish()));
        let chunks = entries.flatMap((e) => chunksOf(e.bytes, c.chunkSize).map((data) => ({ name: e.name, data })));
        const pickIndex = () => random.below(chunks.length);
        // Two different chunks of one file swapped (chunks of different files may come in any order).
        const sameFile = chunks.map((x, i) => (x.name === target.name ? i : -1)).filter((i) => i >= 0);
        const swappable = manipulation === 'reorder' && sameFile.length > 1 && new Set(sameFile.map((i) => chunks[i]!.data.toString('latin1'))).size > 1;
        if (swappable) {
          let i = 0, j = 0;
          while (chunks[i]!.data.equals(chunks[j]!.data)) [i, j] = [random.pick(sameFile), random.pick(sameFile)];
          [chunks[i], chunks[j]] = [chunks[j]!, chunks[i]!];
        }
        if (manipulation === 'drop') chunks.splice(pickIndex(), 1);
        if (manipulation === 'repeat') { const i = pickIndex(); chunks.splice(i, 0, chunks[i]!); }
        if (manipulation === 'unnamed') chunks.splice(pickIndex(), 0, { name: 'other.bin', data: Buffer.from('x') });
        if (manipulation === 'oversize chunk') chunks = [{ name: target.name, data: Buffer.alloc(3 * 1024 * 1024, 0x20) }];
        if (manipulation === 'interleave') chunks = interleaveInOrder(random, entries.map((e) => chunksOf(e.bytes, c.chunkSize).map((data) => ({ name: e.name, data }))));
        let payloads = [header, ...chunks.map((x) => chunk(x.name, x.data))];
        if (manipulation === 'header twice') payloads.splice(1 + random.below(payloads.length), 0, header);
        if (manipulation === 'no header') payloads = payloads.slice(1);
        if (manipulation === 'header only') payloads = [header];
        const unchanged = manipulation === 'none' || manipulation === 'interleave' || (manipulation === 'reorder' && !swappable);
        const method = c.kind === 'dataset' ? METHODS.uploadDataset! : METHODS.importAdapter!;
        const outcome = await send(method.path, method, payloads, manipulation === 'cancel' ? { cancelAfterMs: random.int(0, 5) } : {});
        if (serve.child.exitCode !== null) return { failure: `the server exited (${serve.child.exitCode})` };
        // Visible afterwards: the entry exactly when the call succeeded; never anything in tmp/.
        const kindFolder = c.kind === 'dataset' ? 'datasets' : 'adapters';
        const visible = (await readdir(join(sandbox, 'data', kindFolder))).includes(id);
        const leftovers = await waitEmpty(join(sandbox, 'data', 'tmp'));
        if (leftovers.length > 0) return { failure: `left in tmp/: ${leftovers.join(', ')}` };
        if (visible !== (outcome.code === grpc.status.OK)) return { failure: `${grpc.status[outcome.code]} but the ${c.kind} is ${visible ? '' : 'not '}visible` };
        if (outcome.code === grpc.status.OK) {
          if (!unchanged && manipulation !== 'cancel' && !(manipulation === 'repeat' && chunks.length === 0)) return { failure: `a ${manipulation} stream was accepted` };
          return 'accepted';
        }
        if (unchanged) return { failure: `an intact stream was refused: ${grpc.status[outcome.code]} ${outcome.details}` };
        const code = clearCode(outcome);
        if (code === null) return { failure: `answered ${grpc.status[outcome.code]}: ${outcome.details}` };
        throw Object.assign(new Error(outcome.details), { code: outcome.reason ?? code });
      },
    });
    expect(summary.crashes).toEqual([]);
    expect(summary.hangs).toEqual([]);
  }, 3_600_000);

  it('the server is still healthy, logged no unknown failure and no sanitizer report', async () => {
    expect(serve.child.exitCode).toBeNull();
    const info = await call(clients.model.getModelInfo, clients.model, {});
    expect(info.architecture?.vocabSize).toBe(128256);
    const errors = serve.lines.filter((line) => line.level === 'error' || line.level === 'fatal' || Number(line.level) >= 50);
    const sanitizer = serve.stderr().match(SANITIZER_REPORT) ?? [];
    record('process-rpc-fuzz', { errorLogLines: errors.length, sanitizerReports: sanitizer.length, sanitized: (process.env.TUNESERVE_NATIVE_ADDON ?? '').includes('/sanitize/') });
    expect(sanitizer).toEqual([]);
    expect(errors.map((line) => `${line.msg}: ${JSON.stringify(line).slice(0, 400)}`)).toEqual([]);
  }, 60_000);
});

/** Several files' chunks merged into one stream, each file's chunks still in order. */
function interleaveInOrder<T>(random: Random, lists: T[][]): T[] {
  const out: T[] = [];
  const queues = lists.map((l) => [...l]);
  while (queues.some((q) => q.length > 0)) {
    const open = queues.filter((q) => q.length > 0);
    out.push(random.pick(open).shift()!);
  }
  return out;
}

/** tmp/ is emptied in the handler's finally, which may end just after the status is sent. */
async function waitEmpty(folder: string): Promise<string[]> {
  for (let i = 0; i < 50; i++) {
    const left = await readdir(folder);
    if (left.length === 0) return [];
    await new Promise((r) => setTimeout(r, 20));
  }
  return readdir(folder);
}
