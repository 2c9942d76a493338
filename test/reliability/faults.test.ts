// Faults on real `tuneserve serve` processes (tiny model, CPU, plaintext on 127.0.0.1), each followed by
// the checks that say nothing was lost or half-written:
// - SIGKILL during an adapter save, at each point of it (its folder created in the job's work folder,
//   the config being written, the weights file being written, then in place, the metadata being
//   written, the folder published): after a restart nothing half-written is visible,
//   every stored adapter (an earlier one among them, byte for byte) passes its integrity check and
//   loads, the job's history is intact, and the job resumes to a complete adapter;
// - SIGKILL during a merge, at each point of it (temp folder, shard, tokenizer, manifest, publish):
//   after a restart no temp folder is left in the export root, the output is absent or complete, the
//   base and the adapter are intact, and the merge can be run (again);
// - a full disk while saving (a size-limited tmpfs the test mounts as the data root): a clear
//   RESOURCE_EXHAUSTED STORAGE_FULL or a job failed with STORAGE_FULL, nothing half-written, the
//   service keeps serving, and once space is freed the same work succeeds;
// - a stored adapter whose bytes changed on disk: refused at load (DATA_LOSS), before and after a
//   restart, the others unaffected.
// The kill points are reached by watching the data root (inotify through fs.watch) and sending SIGKILL
// on the first event of the point; what was on disk at that moment is recorded. SIGKILL during
// training (resume from the checkpoint, history intact) is test/e2e/resume.test.ts.

import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, statfs, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { status, type ServiceError } from '@grpc/grpc-js';

import { createClients, importAdapterFolder, type TuneClients } from '../../src/client/index.js';
import { Engine } from '../../src/engine/engine.js';
import { makeModel } from '../../src/engine/make-model.js';
import { loadModelFolder } from '../../src/engine/model-folder.js';
import { createLoraConfig } from '../../src/engine/peft-config.js';
import { GenerateRequest } from '../../src/gen/tuneserve/v1/generation.js';
import { JobState, TrainingConfig, type JobEvent } from '../../src/gen/tuneserve/v1/training.js';
import { MergeAndUnloadRequest } from '../../src/gen/tuneserve/v1/adapters.js';
import { statusDetailsOf } from '../../src/server/status-details.js';
import { FULL, record } from '../helpers/fuzz.js';
import { inheritedSanitizerEnv, SANITIZER_REPORT } from '../helpers/sanitizer.js';
import { startServe, type ServeProcess } from '../helpers/serve-process.js';
import { call, collect, eventually, upload } from '../server/harness.js';

interface Served {
  process: ServeProcess;
  clients: TuneClients;
}

const sha256 = (bytes: Buffer): string => createHash('sha256').update(bytes).digest('hex');

// Rank 256 on every linear layer of the tiny model: a 2.5 MB adapter, so writing it takes long enough
// for a watcher to catch it mid-write.
const saveConfig = (fields: Partial<TrainingConfig> = {}) => TrainingConfig.fromPartial({
  rank: 256, alpha: 16, dropout: 0, targetModules: ['all-linear'], learningRate: 1e-3, maxSteps: 2, batchSize: 2, gradAccum: 1, seed: 1,
  checkpointEvery: 1, ...fields,
});
const ROWS = Array.from({ length: 6 }, (_, i) => JSON.stringify({ prompt: `Q${i}: colour?`, completion: ` A${i}: blue.` })).join('\n');

/** Every path under a folder, relative to it (folders end with "/"). */
async function tree(root: string, under = ''): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(join(root, under), { withFileTypes: true }).catch(() => [])) {
    const path = under === '' ? entry.name : `${under}/${entry.name}`;
    out.push(entry.isDirectory() ? `${path}/` : path);
    if (entry.isDirectory()) out.push(...(await tree(root, path)));
  }
  return out.sort();
}

/**
 * SIGKILLs the process on the first file-system event under `root` whose relative path matches
 * `point`; resolves with that path and the tree at the kill, or null when `until` resolves first.
 */
function killAt(served: Served, root: string, point: RegExp, until: Promise<unknown>): Promise<{ path: string; tree: string[] } | null> {
  return new Promise((resolve) => {
    let done = false;
    const watcher: FSWatcher = watch(root, { recursive: true }, (_event, name) => {
      if (done || name === null || !point.test(String(name))) return;
      done = true;
      served.process.child.kill('SIGKILL');
      watcher.close();
      void tree(root).then((t) => resolve({ path: String(name), tree: t }));
    });
    // The recursive watcher rescans folders as they appear; one removed meanwhile is not an error here.
    watcher.on('error', () => {});
    void until.finally(() => {
      if (done) return;
      done = true;
      watcher.close();
      resolve(null);
    });
  });
}

describe('faults on real serve processes', () => {
  let sandbox: string;
  let model: string;
  let adapterDir: string;
  const running: Served[] = [];

  async function serve(dataRoot: string, extra: string[] = []): Promise<Served> {
    const process = await startServe(['--model', model, '--data-root', dataRoot, '--host', '127.0.0.1', '--plaintext', '--device', 'cpu', '--threads', '1', ...extra], inheritedSanitizerEnv());
    const served = { process, clients: createClients(`127.0.0.1:${process.port}`, { plaintext: true }) };
    running.push(served);
    return served;
  }

  async function stop(served: Served, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    served.clients.close();
    if (served.process.child.exitCode === null && served.process.child.signalCode === null) served.process.child.kill(signal);
    await served.process.exited;
    // A sanitizer report or an unknown failure in any process fails the suite.
    expect(served.process.stderr().match(SANITIZER_REPORT) ?? []).toEqual([]);
    expect(served.process.lines.filter((l) => l.level === 'error' || l.level === 'fatal' || Number(l.level) >= 50).map((l) => l.msg)).toEqual([]);
  }

  /** Loads an adapter (integrity-checked), generates two tokens with it, unloads it. */
  async function usable(clients: TuneClients, adapterId: string): Promise<void> {
    await call(clients.adapters.loadAdapter, clients.adapters, { adapterId });
    const g = await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'Q1: colour?', adapterId, maxTokens: 2, temperature: 0, returnTokenIds: true })));
    expect(g.error).toBeNull();
    await call(clients.adapters.unloadAdapter, clients.adapters, { adapterId });
  }

  /** Events of a job, in order; their sequence numbers must run 1, 2, 3... with no gap. */
  async function history(clients: TuneClients, jobId: string): Promise<JobEvent[]> {
    const { job } = await call(clients.training.getJob, clients.training, { jobId, includeHistory: true });
    const events = (await collect(clients.training.watchJob({ jobId, afterSequence: 0 }))).messages.map((m) => m.event!);
    expect(events.map((e) => e.sequence)).toEqual(Array.from({ length: events.length }, (_, i) => i + 1));
    expect(job?.jobId).toBe(jobId);
    return events;
  }

  beforeAll(async () => {
    sandbox = await mkdtemp(join(tmpdir(), 'tuneserve-faults-'));
    model = join(sandbox, 'model');
    await makeModel({ preset: 'tiny', outDir: model, seed: 6 });
    const engine = await Engine.load(model, { device: 'cpu', quant: 'nf4', maxSeqLen: 32, log: () => {} });
    try {
      adapterDir = join(sandbox, 'prev-adapter');
      await engine.saveAdapter(engine.createAdapter(createLoraConfig({ r: 4, alpha: 8, targets: ['q_proj', 'v_proj'] }), 2), adapterDir);
    } finally {
      engine.close();
    }
  }, 300_000);

  afterAll(async () => {
    for (const served of running) {
      served.clients.close();
      served.process.kill();
    }
    if (sandbox) await rm(sandbox, { recursive: true, force: true });
  });

  it('SIGKILL at each point of an adapter save: nothing half-written visible, the earlier adapter intact, the job resumes', async () => {
    const dataRoot = join(sandbox, 'save-data');
    const points: Array<[string, RegExp]> = [
      ['save started (folder created in the work folder)', /^tmp\/job-[^/]+\/adapter$/],
      ['adapter_config.json being written', /^tmp\/job-[^/]+\/adapter\/\.adapter_config\.json\.tmp-/],
      ['weights file being written', /^tmp\/job-[^/]+\/adapter\/\.adapter_model\.safetensors\.tmp-/],
      ['weights file in place', /^tmp\/job-[^/]+\/adapter\/adapter_model\.safetensors$/],
      ['tuneserve.json being written', /^tmp\/job-[^/]+\/adapter\/\.tuneserve\.json\.tmp-/],
      ['adapter published', /^adapters\/save-\d+$/],
    ];
    const chosen = FULL ? points : points.filter((_, i) => i === 2 || i === 5);
    let served = await serve(dataRoot);
    await upload(served.clients, 'qa', ROWS);
    await importAdapterFolder(served.clients, 'prev', adapterDir);
    const prevBytes = await readFile(join(dataRoot, 'adapters', 'prev', 'adapter_model.safetensors'));
    const trials: object[] = [];
    for (const [index, [label, point]] of chosen.entries()) {
      const jobId = `save-${index}`;
      await collect(served.clients.training.train({ jobId, adapterId: jobId, datasetId: 'qa', initAdapterId: '', detach: true, config: saveConfig() }));
      const ended = eventually(async () => {
        const { job } = await call(served.clients.training.getJob, served.clients.training, { jobId, includeHistory: false });
        return job?.state === JobState.JOB_STATE_SUCCEEDED || job?.state === JobState.JOB_STATE_FAILED;
      }, 120_000).catch(() => undefined);
      const killed = await killAt(served, dataRoot, point, ended);
      expect(killed, `the kill point "${label}" was never reached`).not.toBeNull();
      await stop(served, 'SIGKILL');

      served = await serve(dataRoot);
      const { clients } = served;
      // Nothing half-written: tmp/ is swept at start, every stored adapter passes its integrity check.
      expect(await readdir(join(dataRoot, 'tmp'))).toEqual([]);
      const stored = (await readdir(join(dataRoot, 'adapters'))).sort();
      for (const id of stored) await usable(clients, id);
      expect(sha256(await readFile(join(dataRoot, 'adapters', 'prev', 'adapter_model.safetensors')))).toBe(sha256(prevBytes));
      // The job's history is intact and the job ends with its adapter, resumed if it was interrupted.
      const { job } = await call(clients.training.getJob, clients.training, { jobId, includeHistory: false });
      const before = await history(clients, jobId);
      expect(before.filter((e) => e.step).map((e) => e.step!.step)).toEqual([1, 2]);
      const state = job!.state;
      if (state === JobState.JOB_STATE_INTERRUPTED) {
        expect(stored).not.toContain(jobId);
        expect(before.at(-1)?.interrupted).toBeDefined();
        await call(clients.training.resumeJob, clients.training, { jobId });
        const after = await history(clients, jobId);
        expect(after.slice(0, before.length)).toEqual(before);
        expect(after.at(-1)?.completed?.adapterId).toBe(jobId);
      } else {
        expect(state).toBe(JobState.JOB_STATE_SUCCEEDED);
        expect(before.at(-1)?.completed?.adapterId).toBe(jobId);
      }
      await usable(clients, jobId);
      trials.push({ point: label, killedAt: killed!.path, stateAfterRestart: JobState[state], onDisk: killed!.tree.filter((p) => p.startsWith('tmp/') || p.startsWith(`adapters/${jobId}`)) });
    }
    await stop(served);
    record('fault-sigkill-adapter-save', { name: 'SIGKILL during an adapter save, then restart', trials: trials.length, survived: trials.length, details: trials });
  }, 1_800_000);

  it('SIGKILL at each point of a merge: no temp folder left, output absent or complete, base and adapter intact', async () => {
    const dataRoot = join(sandbox, 'merge-data');
    const exports = join(dataRoot, 'exports');
    const points: Array<[string, RegExp]> = [
      ['merge temp folder created', /^\.[^/]*\.tmp-[^/]*$/],
      ['shard being written', /\/model\.safetensors\.partial/],
      ['tokenizer.json being written', /\/\.tokenizer\.json\.tmp-/],
      ['manifest written', /\/tuneserve-manifest\.json$/],
      ['merged folder published', /^merged-\d+$/],
    ];
    const chosen = FULL ? points : points.filter((_, i) => i === 1 || i === 4);
    let served = await serve(dataRoot);
    await importAdapterFolder(served.clients, 'prev', adapterDir);
    const baseBytes = sha256(await readFile(join(model, 'model.safetensors')));
    const prevBytes = sha256(await readFile(join(dataRoot, 'adapters', 'prev', 'adapter_model.safetensors')));
    const trials: object[] = [];
    for (const [index, [label, point]] of chosen.entries()) {
      const outputName = `merged-${index}`;
      const merge = collect(served.clients.adapters.mergeAndUnload(MergeAndUnloadRequest.fromPartial({ adapterId: 'prev', outputName })));
      const killed = await killAt(served, exports, point, merge);
      expect(killed, `the kill point "${label}" was never reached`).not.toBeNull();
      await merge;
      await stop(served, 'SIGKILL');

      served = await serve(dataRoot);
      const { clients } = served;
      const left = await readdir(exports);
      expect(left.filter((name) => name.includes('.tmp-'))).toEqual([]);
      expect(sha256(await readFile(join(model, 'model.safetensors')))).toBe(baseBytes);
      expect(sha256(await readFile(join(dataRoot, 'adapters', 'prev', 'adapter_model.safetensors')))).toBe(prevBytes);
      await usable(clients, 'prev');
      if (left.includes(outputName)) {
        // Published before the kill: complete, every byte as its manifest says.
        await loadModelFolder(join(exports, outputName));
        const again = await collect(clients.adapters.mergeAndUnload(MergeAndUnloadRequest.fromPartial({ adapterId: 'prev', outputName })));
        expect(again.error?.code).toBe(status.ALREADY_EXISTS);
      } else {
        const again = await collect(clients.adapters.mergeAndUnload(MergeAndUnloadRequest.fromPartial({ adapterId: 'prev', outputName })));
        expect(again.error).toBeNull();
        await loadModelFolder(join(exports, outputName));
      }
      trials.push({ point: label, killedAt: killed!.path, outputAfterRestart: left.includes(outputName) ? 'complete' : 'absent', onDisk: killed!.tree });
    }
    await stop(served);
    record('fault-sigkill-merge', { name: 'SIGKILL during a merge, then restart', trials: trials.length, survived: trials.length, details: trials.map((t) => ({ ...t, onDisk: undefined })) });
  }, 1_800_000);

  it('a full disk while saving: clear errors, nothing half-written, still serving, and it works once space is freed', async () => {
    const mountPoint = join(sandbox, 'full');
    await mkdir(mountPoint);
    const how = mountSmallFilesystem(mountPoint, 24);
    const dataRoot = join(mountPoint, 'data');
    const served = await serve(dataRoot);
    const { clients } = served;
    const steps: string[] = [];
    try {
      await upload(clients, 'qa', ROWS);
      // Leave about 1 MiB: room for the job's records, not for its 2.5 MB adapter.
      const filler = join(mountPoint, 'filler');
      const free = async () => { const s = await statfs(mountPoint); return s.bavail * s.bsize; };
      await writeFile(filler, Buffer.alloc(Math.max(0, (await free()) - 1024 * 1024)));
      await collect(clients.training.train({ jobId: 'full-1', adapterId: 'full-1', datasetId: 'qa', initAdapterId: '', detach: true, config: saveConfig({ checkpointEvery: 0 }) }));
      const failed = await eventually(async () => {
        const { job } = await call(clients.training.getJob, clients.training, { jobId: 'full-1', includeHistory: false });
        return job?.state === JobState.JOB_STATE_FAILED ? job : null;
      }, 120_000);
      expect(failed.failureReason).toBe('STORAGE_FULL');
      expect(await readdir(join(dataRoot, 'adapters'))).toEqual([]);
      expect(await readdir(join(dataRoot, 'tmp'))).toEqual([]);
      steps.push('adapter save refused: job FAILED (STORAGE_FULL), nothing in adapters/ or tmp/');

      // An upload that does not fit, and a merge: clear refusals, nothing visible.
      const big = Buffer.from(`${'{"text":"padding padding padding"}\n'.repeat(60_000)}`);
      const refused = await upload(clients, 'big', big).then(() => null, (e: ServiceError) => e);
      expect([refused?.code, statusDetailsOf(refused!)?.reason]).toEqual([status.RESOURCE_EXHAUSTED, 'STORAGE_FULL']);
      expect(await readdir(join(dataRoot, 'datasets'))).toEqual(['qa']);
      await importAdapterFolder(clients, 'small', adapterDir).catch(() => undefined); // may or may not fit: either is fine
      const merge = await collect(clients.adapters.mergeAndUnload(MergeAndUnloadRequest.fromPartial({ adapterId: (await readdir(join(dataRoot, 'adapters')))[0] ?? 'small', outputName: 'm1' })));
      if (merge.error) expect([merge.error.code, statusDetailsOf(merge.error)?.reason]).toEqual([status.RESOURCE_EXHAUSTED, 'STORAGE_FULL']);
      expect((await readdir(join(dataRoot, 'exports'))).filter((n) => n.includes('.tmp-'))).toEqual([]);
      expect(await readdir(join(dataRoot, 'tmp'))).toEqual([]);
      steps.push('upload and merge refused with RESOURCE_EXHAUSTED STORAGE_FULL, nothing half-written');

      // Completely full: reading and generating go on; what must write is refused clearly.
      await writeFile(join(mountPoint, 'filler-2'), Buffer.alloc(await free())).catch(() => undefined);
      const info = await call(clients.model.getModelInfo, clients.model, {});
      expect(info.architecture?.vocabSize).toBe(128256);
      expect((await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'hi', maxTokens: 3 })))).error).toBeNull();
      const submit = await collect(clients.training.train({ jobId: 'full-2', adapterId: 'full-2', datasetId: 'qa', initAdapterId: '', detach: true, config: saveConfig({ checkpointEvery: 0 }) }));
      if (submit.error) expect([submit.error.code, statusDetailsOf(submit.error)?.reason]).toEqual([status.RESOURCE_EXHAUSTED, 'STORAGE_FULL']);
      steps.push(`with 0 bytes free: model info and generation served; a new job ${submit.error ? 'refused with RESOURCE_EXHAUSTED STORAGE_FULL' : 'queued'}`);
      expect(served.process.child.exitCode).toBeNull();

      // Space freed: the same work succeeds.
      await rm(filler);
      await rm(join(mountPoint, 'filler-2'), { force: true });
      await call(clients.training.resumeJob, clients.training, { jobId: 'full-1' }).catch(async () => {
        await collect(clients.training.train({ jobId: 'full-3', adapterId: 'full-1', datasetId: 'qa', initAdapterId: '', detach: true, config: saveConfig({ checkpointEvery: 0 }) }));
      });
      await eventually(async () => (await readdir(join(dataRoot, 'adapters'))).includes('full-1'), 120_000);
      await usable(clients, 'full-1');
      steps.push('space freed: the adapter trains and saves, and loads');
      await stop(served);
    } finally {
      served.process.kill();
      await served.process.exited;
      execFileSync('umount', ['-l', mountPoint]);
    }
    record('fault-full-disk', { name: `full disk while saving (${how})`, trials: 1, survived: 1, details: steps });
  }, 900_000);

  it('an adapter whose bytes changed on disk is refused at load, before and after a restart; others unaffected', async () => {
    const dataRoot = join(sandbox, 'corrupt-data');
    let served = await serve(dataRoot);
    await importAdapterFolder(served.clients, 'bad', adapterDir);
    await importAdapterFolder(served.clients, 'good', adapterDir);
    const file = join(dataRoot, 'adapters', 'bad', 'adapter_model.safetensors');
    const bytes = await readFile(file);
    const damaged = Buffer.from(bytes);
    damaged[damaged.length >> 1] ^= 0x40;
    await writeFile(file, damaged);
    const refusals: string[] = [];
    for (const round of ['running server', 'after a restart']) {
      const { clients } = served;
      const load = await call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'bad' }).then(() => null, (e: ServiceError) => e);
      expect([load?.code, statusDetailsOf(load!)?.reason]).toEqual([status.DATA_LOSS, 'INTEGRITY_MISMATCH']);
      const g = await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'hi', adapterId: 'bad', maxTokens: 2 })));
      expect(g.error?.code).toBe(status.DATA_LOSS);
      await usable(clients, 'good');
      refusals.push(`${round}: ${load!.details}`);
      if (round === 'running server') {
        await stop(served);
        served = await serve(dataRoot);
      }
    }
    await writeFile(file, bytes);
    await usable(served.clients, 'bad');
    await stop(served);
    record('fault-corrupted-adapter', { name: 'adapter bytes changed on disk (same size)', trials: 2, survived: 2, details: refusals });
  }, 600_000);
});

/** Mounts a tmpfs of `mb` MiB (or, failing that, a loop-mounted ext4 image); throws when neither works. */
function mountSmallFilesystem(mountPoint: string, mb: number): string {
  const errors: string[] = [];
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${mb}m`, 'tmpfs', mountPoint], { stdio: 'pipe' });
    return `a ${mb} MiB tmpfs`;
  } catch (error) {
    errors.push(`tmpfs: ${String((error as { stderr?: Buffer }).stderr ?? error).trim()}`);
  }
  try {
    const image = `${mountPoint}.img`;
    execFileSync('truncate', ['-s', `${mb}M`, image]);
    execFileSync('mkfs.ext4', ['-q', '-F', image], { stdio: 'pipe' });
    execFileSync('mount', ['-o', 'loop', image, mountPoint], { stdio: 'pipe' });
    return `a ${mb} MiB loop-mounted ext4 image`;
  } catch (error) {
    errors.push(`loop image: ${String((error as { stderr?: Buffer }).stderr ?? error).trim()}`);
  }
  // Not a skip: the fault cannot be shown on this machine, and the suite says so by failing.
  throw new Error(`the full-disk fault needs a small file system and none could be mounted (run as root with CAP_SYS_ADMIN):\n${errors.join('\n')}`);
}
