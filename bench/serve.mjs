// `npm run bench:serve`: many adapters under load, against a real `tuneserve serve` process on
// loopback (the small random model by default, NF4 base, the CPU unless --device says otherwise),
// driven by the load generator of src/loadgen/load.ts. Phases:
//   one adapter / eight adapters  the same seeded requests (only the adapter differs), Poisson arrivals
//                                 faster than the server serves them, so all N streams stay busy:
//                                 throughput (capacity) and latency, and their ratio;
//   switch cost                   sequential single-token requests: the same resident adapter each time vs
//                                 alternating two resident ones (time to first token, medians);
//   cold load                     an r16 q/k/v/o adapter read from disk, and placed back from the host tier;
//   LRU                           more adapters than device slots under load;
//   chaos                         random cancels and deadlines, more streams than the server admits;
//   training                      the eight-adapter load again with a training job alongside (the serving policy).
// Every phase must end with 0 lost and 0 hung. Prints the figures and writes bench/results/<date>-serve-<device>.md.
//
//   npm run bench:serve -- [--model DIR] [--preset small] [--device cpu] [--streams 8] [--rate 6]
//                          [--requests 80] [--slots 8] [--max-tokens 24] [--seed 1] [--quick]

import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const { values } = parseArgs({
  options: {
    model: { type: 'string' }, preset: { type: 'string', default: 'small' }, device: { type: 'string', default: 'cpu' },
    streams: { type: 'string', default: '8' }, rate: { type: 'string', default: '6' }, 'saturate-rate': { type: 'string', default: '40' },
    requests: { type: 'string', default: '80' },
    slots: { type: 'string', default: '8' }, 'max-tokens': { type: 'string', default: '24' }, seed: { type: 'string', default: '1' },
    'inter-token-target-ms': { type: 'string', default: '100' }, 'min-training-share': { type: 'string', default: '20' },
    quick: { type: 'boolean', default: false }, out: { type: 'string' },
  },
});
const streams = Number(values.streams), rate = Number(values.rate), saturate = Number(values['saturate-rate']), slots = Number(values.slots), seed = Number(values.seed);
const requests = values.quick ? 16 : Number(values.requests), maxTokens = Number(values['max-tokens']);

const { makeModel } = await import(join(root, 'dist', 'engine', 'make-model.js'));
const { randomAdapterFiles } = await import(join(root, 'dist', 'loadgen', 'adapters.js'));
const { runLoad, percentiles } = await import(join(root, 'dist', 'loadgen', 'load.js'));
const { createClients } = await import(join(root, 'dist', 'client', 'connection.js'));
const { importAdapterFolder } = await import(join(root, 'dist', 'client', 'files.js'));
const { GenerateRequest } = await import(join(root, 'dist', 'gen', 'tuneserve', 'v1', 'generation.js'));
const { TrainingConfig } = await import(join(root, 'dist', 'gen', 'tuneserve', 'v1', 'training.js'));

const work = mkdtempSync(join(tmpdir(), 'tuneserve-bench-serve-'));
const log = (line) => process.stderr.write(`${line}\n`);
const modelDir = values.model ?? join(work, 'model');
if (!values.model) {
  log(`making the ${values.preset} preset model`);
  await makeModel({ preset: values.preset, outDir: modelDir, seed: 0 });
}

// ---- the server process --------------------------------------------------------------------------

const maxConcurrent = streams * 2;
const server = spawn(process.execPath, [
  join(root, 'bin', 'tuneserve.js'), 'serve', '--model', modelDir, '--data-root', join(work, 'data'), '--plaintext', '--host', '127.0.0.1',
  '--port', '0', '--device', values.device, '--adapter-slots', String(slots), '--max-concurrent-generations', String(maxConcurrent),
  '--max-seq-len', '1024', '--inter-token-target-ms', values['inter-token-target-ms'], '--min-training-share-percent', values['min-training-share'],
], { cwd: root, env: { PATH: process.env.PATH, HOME: process.env.HOME }, stdio: ['ignore', 'ignore', 'pipe'] });
const port = await new Promise((resolve, reject) => {
  let pending = '';
  let listening = null;
  server.stderr.on('data', (chunk) => {
    pending += chunk.toString();
    let newline;
    while ((newline = pending.indexOf('\n')) !== -1) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      try {
        const entry = JSON.parse(line);
        if (entry.msg === 'listening') listening = entry.port;
        if (entry.msg === 'serving') resolve(listening);
        if (entry.level >= 50) log(`server: ${line}`);
      } catch {
        log(`server: ${line}`);
      }
    }
  });
  server.on('exit', (code) => reject(new Error(`tuneserve serve exited with ${code}`)));
});
const peakRssBytes = () => {
  const match = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${server.pid}/status`, 'utf8'));
  return match ? Number(match[1]) * 1024 : 0;
};
const clients = createClients(`127.0.0.1:${port}`, { plaintext: true, channelOptions: { 'grpc.max_receive_message_length': 16 * 1024 * 1024 } });
const unary = (client, method, request) => new Promise((resolve, reject) => method.call(client, request, (error, response) => (error ? reject(error) : resolve(response))));
const modelInfo = () => unary(clients.model, clients.model.getModelInfo, {});
const getAdapter = async (adapterId) => (await unary(clients.adapters, clients.adapters.getAdapter, { adapterId })).adapter;

// ---- adapters -------------------------------------------------------------------------------------

const info = await modelInfo();
const a = info.architecture;
const shape = { hiddenSize: a.hiddenSize, intermediateSize: a.intermediateSize, numLayers: a.numLayers, numHeads: a.numAttentionHeads, numKvHeads: a.numKeyValueHeads, headDim: a.headDim };
async function importRandom(id, adapterSeed) {
  const folder = join(work, 'adapters', id);
  mkdirSync(folder, { recursive: true });
  for (const [name, bytes] of Object.entries(randomAdapterFiles(shape, { rank: 16, seed: adapterSeed, targets: 'q_proj,k_proj,v_proj,o_proj' }))) writeFileSync(join(folder, name), bytes);
  await importAdapterFolder(clients, id, folder);
}
const eight = Array.from({ length: 8 }, (_, i) => `a${i}`);
const many = Array.from({ length: 3 * slots }, (_, i) => `x${i}`);
log(`importing ${eight.length + many.length + 1} r16 q/k/v/o adapters`);
for (const [i, id] of [...eight, ...many, 'cold'].entries()) await importRandom(id, 100 + i);

// ---- phases ---------------------------------------------------------------------------------------

const common = { clients, requests, ratePerSecond: rate, streams, promptTokens: { min: 8, max: 64 }, maxTokens: { min: Math.max(4, maxTokens / 2), max: maxTokens }, expectedMsPerToken: 2000 };
const poolStats = async () => (await modelInfo()).adapterPool.stats;
const results = [];
async function phase(name, options) {
  log(`phase: ${name}`);
  const before = await poolStats();
  const report = await runLoad({ ...common, seed: seed + results.length, ...options });
  const after = await poolStats();
  const pool = { hits: after.hits - before.hits, hostHits: after.hostHits - before.hostHits, loads: after.loads - before.loads, evictions: after.evictions - before.evictions };
  const row = { name, report, pool };
  results.push(row);
  const failed = Object.entries(report.failed).map(([code, n]) => `${code} ${n}`).join(', ') || '0';
  log(`  sent ${report.sent}, completed ${report.completed}, cancelled ${report.cancelled}, failed ${failed}, lost ${report.lost}, hung ${report.hung}; ` +
    `TTFT p50 ${report.ttftMs.p50.toFixed(1)} ms p99 ${report.ttftMs.p99.toFixed(1)} ms; inter-token p50 ${report.interTokenMs.p50.toFixed(1)} ms ` +
    `p99 ${report.interTokenMs.p99.toFixed(1)} ms; ${report.outputTokensPerSecond.toFixed(1)} tokens/s; pool hits ${pool.hits}, host hits ${pool.hostHits}, loads ${pool.loads}, evictions ${pool.evictions}`);
  return row;
}

// Single-token requests one at a time, prompt of 16 tokens.
async function ttft(adapterId) {
  const started = performance.now();
  return new Promise((resolve, reject) => {
    const stream = clients.generation.generate(GenerateRequest.fromPartial({ tokenIds: { ids: Array.from({ length: 16 }, (_, i) => 2000 + i) }, adapterId, maxTokens: 1, temperature: 0, ignoreEos: true, returnTokenIds: true }));
    let first = null;
    stream.on('data', (m) => { if (first === null && m.tokenIds.length > 0) first = performance.now() - started; });
    stream.on('error', reject);
    stream.on('end', () => resolve(first));
  });
}
// Warm-up: the kernels paged in, every one of the eight in a slot.
await runLoad({ ...common, requests: 8, ratePerSecond: 100, adapters: eight, seed: 999 });
for (const id of eight) await ttft(id);
const capacity = { ratePerSecond: saturate, seed: seed + 100 };  // the same requests in each capacity phase
// Two rounds, alternating, so that a slow spell of a shared machine does not fall on one side only.
const loadAtStart = loadavg()[0];
const capacityRounds = values.quick ? 1 : 2;
const oneRows = [], eightRows = [];
for (let round = 1; round <= capacityRounds; round++) {
  oneRows.push(await phase(`one adapter (${saturate}/s offered), round ${round}`, { adapters: ['a0'], ...capacity }));
  eightRows.push(await phase(`eight adapters (${saturate}/s offered), round ${round}`, { adapters: eight, ...capacity }));
}
const tokensPerSecond = (rows) => rows.reduce((s, r) => s + r.report.outputTokens, 0) / rows.reduce((s, r) => s + r.report.wallSeconds, 0);
const one = oneRows.at(-1), eightRow = eightRows.at(-1);

log('phase: switch cost');
const rounds = values.quick ? 10 : 40;
for (const id of ['a0', 'a1', 'a2']) await ttft(id);
const same = [], alternating = [];
for (let i = 0; i < rounds; i++) {
  same.push(await ttft('a0'));
  alternating.push(await ttft(i % 2 === 0 ? 'a1' : 'a2'));
}
const switchCost = { same: percentiles(same), alternating: percentiles(alternating) };
log(`  TTFT p50 same adapter ${switchCost.same.p50.toFixed(2)} ms, alternating two resident ${switchCost.alternating.p50.toFixed(2)} ms`);

// Cold load from disk, then from the host tier after an eviction.
log('phase: cold load');
await ttft('cold');
let cold = await getAdapter('cold');
const coldLoadMs = cold.stats.lastLoadSeconds * 1000;
for (const id of many.slice(0, slots)) await ttft(id);  // push it out of its slot
const beforeHost = (await getAdapter('cold')).stats;
await ttft('cold');
cold = await getAdapter('cold');
const hostPlaceMs = ((cold.stats.placeSeconds - beforeHost.placeSeconds) / Math.max(1, cold.stats.placements - beforeHost.placements)) * 1000;
log(`  cold load from disk ${coldLoadMs.toFixed(2)} ms (${(cold.sizeBytes / 1048576).toFixed(2)} MiB); back from the host tier ${hostPlaceMs.toFixed(3)} ms; host hits ${cold.stats.hostHits}, loads ${cold.stats.loads}`);

const lru = await phase(`LRU: ${many.length} adapters over ${slots} slots (${rate}/s)`, { adapters: many, ratePerSecond: rate });
const chaos = await phase(`chaos: cancels 15%, deadlines 15%, ${streams * 3} streams for ${maxConcurrent} admitted`, {
  adapters: eight, streams: streams * 3, ratePerSecond: saturate, cancelFraction: 0.15, deadlineFraction: 0.15, deadlineMs: { min: 100, max: 3000 },
});

// Training alongside: a long job, then the eight-adapter load, then cancel the job.
log('phase: training alongside');
const rows = Array.from({ length: 16 }, (_, i) => JSON.stringify({ text: `Row ${i}: ${'the quick brown fox jumps over the lazy dog '.repeat(4)}` })).join('\n');
const job = clients.training.train({
  jobId: 'bench-job', adapterId: 'bench-trained', inlineJsonl: Buffer.from(rows), initAdapterId: '', detach: false, newVersion: false,
  config: TrainingConfig.fromPartial({ rank: 16, alpha: 32, maxSteps: 100000, batchSize: 2, gradAccum: 1, learningRate: 1e-4, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] }),
});
const shares = [];
let policy = null;
job.on('data', (m) => {
  if (m.event?.started) policy = m.event.started.schedulingPolicy;
  if (m.event?.step) shares.push(m.event.step);
});
job.on('error', () => {});
while (shares.length < 2) await new Promise((resolve) => setTimeout(resolve, 100));
const stepsBefore = shares.length;
const training = await phase(`eight adapters (${saturate}/s offered), training alongside`, { adapters: eight, ...capacity });
const during = shares.slice(stepsBefore);
await unary(clients.training, clients.training.cancelJob, { jobId: 'bench-job' });
const meanShare = during.length ? during.reduce((s, x) => s + x.deviceShare, 0) / during.length : 0;
log(`  training steps during the load ${during.length}, mean device share ${(meanShare * 100).toFixed(1)}%; policy ${JSON.stringify(policy)}`);

const finalInfo = await modelInfo();
const peak = peakRssBytes();
clients.close();
server.kill('SIGTERM');
await new Promise((resolve) => server.on('exit', resolve));

// ---- report ---------------------------------------------------------------------------------------

const oneTps = tokensPerSecond(oneRows), eightTps = tokensPerSecond(eightRows);
const ratio = eightTps / oneTps;
const lostTotal = results.reduce((s, r) => s + r.report.lost, 0), hungTotal = results.reduce((s, r) => s + r.report.hung, 0);
const date = new Date().toISOString().slice(0, 10);
const fmt = (x, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : '–');
const table = [
  '| phase | sent | completed | cancelled | failed (code) | lost | hung | TTFT p50 / p99 ms | inter-token p50 / p99 ms | tokens/s | pool hits / host hits / loads / evictions |',
  '|---|---|---|---|---|---|---|---|---|---|---|',
  ...results.map(({ name, report: r, pool }) => `| ${name} | ${r.sent} | ${r.completed} | ${r.cancelled} | ${Object.entries(r.failed).map(([c, n]) => `${c} ${n}`).join(', ') || '0'} | ${r.lost} | ${r.hung} | ${fmt(r.ttftMs.p50)} / ${fmt(r.ttftMs.p99)} | ${fmt(r.interTokenMs.p50)} / ${fmt(r.interTokenMs.p99)} | ${fmt(r.outputTokensPerSecond)} | ${pool.hits} / ${pool.hostHits} / ${pool.loads} / ${pool.evictions} |`),
];
const cpu = cpus()[0]?.model ?? 'unknown';
const md = `# bench:serve — ${values.preset} model on ${values.device}, ${date}

\`npm run bench:serve -- ${process.argv.slice(2).join(' ')}\` (bench/serve.mjs; load generator src/loadgen/load.ts)

Machine: ${cpu}, ${cpus().length} cores visible, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM. Server: \`tuneserve serve\` on 127.0.0.1,
${info.device}, ${info.quantization === 2 ? 'NF4' : 'unquantized'} base (${values.preset} preset: hidden ${a.hiddenSize}, ${a.numLayers} layers, vocabulary ${a.vocabSize}),
${slots} device slots, at most ${maxConcurrent} generations admitted. Load: ${requests} requests per phase, seeded Poisson arrivals at ${rate}/s
(LRU), ${saturate}/s (the capacity phases, with the same requests in each, and chaos), at most ${streams} streams open (chaos: ${streams * 3}),
prompts of 8–64 token ids, ${common.maxTokens.min}–${maxTokens} new tokens, greedy, seed ${seed}. All adapters r 16 on q/k/v/o, imported as PEFT
folders. Time to first token counts from the request's send (a request waiting for a free stream is not yet sent).

${table.join('\n')}

- Lost ${lostTotal}, hung ${hungTotal} over all phases (every request ended with its final message or a status; none stalled).
- Throughput with 8 distinct adapters / with one, the same requests, all ${streams} streams busy, over ${capacityRounds} alternating round(s): ${fmt(eightTps)} / ${fmt(oneTps)} tokens/s = **${fmt(ratio, 2)}×** (goal ≥ 0.8×). The machine is shared (1-minute load average ${fmt(loadAtStart, 2)} on ${cpus().length} cores when the rounds began): rounds of the same phase differ by as much as the two phases do, so read this as "no loss measurable here", not as a gain.
- Resident adapter switch: time to first token (1 token, 16-token prompt, one request at a time) p50 ${fmt(switchCost.same.p50, 2)} ms with the same adapter, ${fmt(switchCost.alternating.p50, 2)} ms alternating two resident adapters: **${fmt(switchCost.alternating.p50 - switchCost.same.p50, 2)} ms** added (goal < 1 ms).
- Cold load of an r 16 q/k/v/o adapter (${fmt(cold.sizeBytes / 1048576, 2)} MiB float32) from disk: **${fmt(coldLoadMs, 2)} ms**; back into a slot from the host tier: **${fmt(hostPlaceMs, 3)} ms** (on the CPU a slot aliases host memory, so this is bookkeeping only). The 8B-shape goals (< 50 ms from disk, < 5 ms from the host tier) are for a GPU and were not measured here.
- Generation with a training job alongside (policy: inter-token target ${policy?.targetInterTokenMs ?? '?'} ms, minimum training share ${fmt((policy?.minTrainingShare ?? 0) * 100, 0)}%): inter-token p50 / p99 **${fmt(training.report.interTokenMs.p50)} / ${fmt(training.report.interTokenMs.p99)} ms** vs **${fmt(eightRow.report.interTokenMs.p50)} / ${fmt(eightRow.report.interTokenMs.p99)} ms** idle (the last eight-adapter round, the same requests); TTFT p50 ${fmt(training.report.ttftMs.p50)} vs ${fmt(eightRow.report.ttftMs.p50)} ms; the job got ${fmt(meanShare * 100)}% of the engine's busy time over ${during.length} steps (the share counts the moments no generation was running too; training_share gauge at the end: ${fmt(finalInfo.scheduler.trainingShare * 100)}%). Scheduler averages at the end: generation step ${fmt(finalInfo.scheduler.generationStepMs)} ms, training micro-step ${fmt(finalInfo.scheduler.trainingStepMs)} ms: a micro-step longer than the target cannot fit between two tokens, so it runs only when the minimum share calls for it, and those tokens wait for it (the p99).
- Pool since start: ${finalInfo.adapterPool.stats.hits} hits, ${finalInfo.adapterPool.stats.hostHits} host hits, ${finalInfo.adapterPool.stats.loads} loads, ${finalInfo.adapterPool.stats.evictions} evictions, ${finalInfo.adapterPool.stats.loadFailures} load failures.
- Peak RSS of the server process: **${fmt(peak / 2 ** 20, 0)} MiB**.
- Failures by code are the chaos phase's on purpose: DEADLINE_EXCEEDED (client deadlines), RESOURCE_EXHAUSTED (more streams than the server admits, GENERATION_CAPACITY).
`;
process.stdout.write(`${md}\n`);
const outFile = values.out ?? join(root, 'bench', 'results', `${date}-serve-${values.device}.md`);
mkdirSync(dirname(outFile), { recursive: true });
writeFileSync(outFile, md);
log(`written to ${outFile}`);
rmSync(work, { recursive: true, force: true });
if (lostTotal > 0 || hungTotal > 0) process.exitCode = 1;
