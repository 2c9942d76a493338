// Text renderings of what the server returns: durations, sizes, tables, labels of enums, the
// dataset report, the step readout, adapters, jobs and the model.

import { Adapter, AdapterSource } from '../../gen/tuneserve/v1/adapters.js';
import { FinishReason } from '../../gen/tuneserve/v1/generation.js';
import { GetModelInfoResponse, Quantization } from '../../gen/tuneserve/v1/model.js';
import { GetJobResponse, Job, JobState, LrScheduler, type DatasetReport, type TrainingStep } from '../../gen/tuneserve/v1/training.js';

/** Seconds as "42 s", "3 min 05 s". */
export function formatSeconds(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${String(Math.round(seconds - minutes * 60)).padStart(2, '0')} s`;
}

/** Bytes as "1.2 MB". */
export function formatBytes(bytes: number): string {
  if (bytes < 1000) return `${bytes} B`;
  const units = ['kB', 'MB', 'GB', 'TB'];
  let value = bytes / 1000;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

/** Left-aligned columns separated by two spaces; the first row is the header. */
export function formatTable(rows: string[][]): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, [...cell].length)));
  return rows.map((row) => row.map((cell, i) => (i === row.length - 1 ? cell : cell + ' '.repeat((widths[i] ?? 0) - [...cell].length))).join('  ').trimEnd()).join('\n') + '\n';
}

/** An enum value's name without its prefix, lower case: JOB_STATE_RUNNING → running. */
export function enumLabel(name: string, prefix: string): string {
  return name.startsWith(prefix) ? name.slice(prefix.length).toLowerCase() : name.toLowerCase();
}

export function jobStateLabel(state: JobState): string {
  return enumLabel(JobState[state] ?? String(state), 'JOB_STATE_');
}

export function finishReasonLabel(reason: FinishReason): string {
  return enumLabel(FinishReason[reason] ?? String(reason), 'FINISH_REASON_');
}

/** The dataset report event in one line. */
export function datasetReportLine(r: DatasetReport): string {
  const formats = Object.entries(r.rowsByFormat ?? {}).filter(([, n]) => (n as number) > 0).map(([format, n]) => `${n} ${format}`).join(', ');
  const percent = (fraction: number) => `${(fraction * 100).toFixed(1)}%`;
  return `dataset: ${r.rows} rows (${formats}), ${r.tokens} tokens, ${r.scoredTokens} scored; longest ${r.longestRowTokens} tokens (line ${r.longestRowLine}), ` +
    `${r.truncatedRows} truncated to ${r.maxSeqLen}; scored per row mean ${percent(r.meanScoredFraction)}, min ${percent(r.minScoredFraction)} (line ${r.minScoredFractionLine}); ` +
    `packing ${r.packingEnabled ? 'on' : 'off'} (${r.packingReason || 'not reported'}), ${r.trainingSequences} training sequences ${percent(r.sequenceFill)} full`;
}

/** The live readout after one optimizer step. */
export function stepLabel(step: TrainingStep): string {
  return `loss ${step.loss.toFixed(4)}  lr ${step.learningRate.toExponential(2)}  ${step.tokensPerSecond.toFixed(0)} tok/s  ` +
    `epoch ${step.epoch.toFixed(2)}  eta ${formatSeconds(step.etaSeconds)}`;
}

export function adapterRow(a: Adapter): string[] {
  const c = a.config;
  return [
    a.adapterId,
    a.loaded ? 'yes' : 'no',
    a.matchesBase ? 'yes' : 'NO',
    c ? String(c.rank) : '',
    c ? String(c.alpha) : '',
    c ? c.targetModules.join(',') : '',
    enumLabel(AdapterSource[a.source] ?? '', 'ADAPTER_SOURCE_'),
    formatBytes(a.sizeBytes),
    a.metrics ? a.metrics.finalLoss.toFixed(4) : '',
    a.createTime ? a.createTime.toISOString().slice(0, 19).replace('T', ' ') : '',
  ];
}

export const ADAPTER_HEADER = ['ADAPTER', 'LOADED', 'FITS BASE', 'RANK', 'ALPHA', 'TARGETS', 'SOURCE', 'SIZE', 'FINAL LOSS', 'CREATED'];

export function describeAdapter(a: Adapter): string {
  const c = a.config;
  const lines = [
    `adapter      ${a.adapterId}`,
    `source       ${enumLabel(AdapterSource[a.source] ?? '', 'ADAPTER_SOURCE_')}${a.jobId ? ` (job ${a.jobId})` : ''}`,
    `created      ${a.createTime?.toISOString() ?? '?'}`,
    `loaded       ${a.loaded ? 'yes (in a device pool slot)' : 'no'}`,
    `base         ${a.baseFingerprint.slice(0, 16)}… ${a.matchesBase ? '(matches the served base)' : '(built for ANOTHER base)'}`,
    `size         ${formatBytes(a.sizeBytes)}`,
  ];
  if (c) lines.push(`lora         r ${c.rank}, alpha ${c.alpha}${c.useRslora ? ' (rslora)' : ''}, dropout ${c.dropout}, on ${c.targetModules.join(',')}`);
  if (a.metrics) {
    const m = a.metrics;
    lines.push(`metrics      ${m.steps} steps, final loss ${m.finalLoss.toFixed(4)}${m.evalLoss !== undefined ? `, eval loss ${m.evalLoss.toFixed(4)}` : ''}, ${m.tokens} tokens, ${formatSeconds(m.trainSeconds)}`);
  }
  return `${lines.join('\n')}\n`;
}

export function jobRow(j: Job): string[] {
  return [
    j.jobId,
    jobStateLabel(j.state),
    j.adapterId,
    j.totalSteps > 0 ? `${j.lastStep?.step ?? 0}/${j.totalSteps}` : '',
    j.lastStep ? j.lastStep.loss.toFixed(4) : '',
    j.datasetId || 'inline',
    j.createTime ? j.createTime.toISOString().slice(0, 19).replace('T', ' ') : '',
  ];
}

export function describeJob(response: GetJobResponse): string {
  const j = response.job;
  if (!j) return '';
  const lines = [
    `job          ${j.jobId}`,
    `state        ${jobStateLabel(j.state)}${j.state === JobState.JOB_STATE_QUEUED ? ` (${j.queuePosition} ahead)` : ''}`,
    `adapter      ${j.adapterId}${j.initAdapterId ? ` (continues ${j.initAdapterId})` : ''}`,
    `dataset      ${j.datasetId || 'inline rows'}`,
    `created      ${j.createTime?.toISOString() ?? '?'}`,
  ];
  if (j.startTime) lines.push(`started      ${j.startTime.toISOString()}`);
  if (j.endTime) lines.push(`ended        ${j.endTime.toISOString()}`);
  if (j.lastStep) lines.push(`progress     step ${j.lastStep.step}/${j.totalSteps}, ${stepLabel(j.lastStep)}`);
  if (j.metrics) lines.push(`metrics      final loss ${j.metrics.finalLoss.toFixed(4)}, ${j.metrics.steps} steps, ${j.metrics.tokens} tokens, ${formatSeconds(j.metrics.trainSeconds)}`);
  if (j.failureReason) lines.push(`failure      ${j.failureReason}: ${j.failureMessage}`);
  if (j.lastCheckpointStep > 0) lines.push(`checkpoint   step ${j.lastCheckpointStep}`);
  const c = j.config;
  if (c) {
    lines.push(`config       r ${c.rank}, alpha ${c.alpha}, dropout ${c.dropout ?? '?'}, ${c.targetModules.join(',')}; lr ${c.learningRate} ` +
      `${enumLabel(LrScheduler[c.scheduler] ?? '', 'LR_SCHEDULER_')}, batch ${c.batchSize} × ${c.gradAccum}, ` +
      `${c.maxSteps > 0 ? `${c.maxSteps} steps` : `${c.epochs} epoch(s)`}, seed ${c.seed}`);
  }
  let out = `${lines.join('\n')}\n`;
  if (response.steps.length > 0) {
    out += `\n${formatTable([['STEP', 'EPOCH', 'LOSS', 'GRAD NORM', 'LR', 'TOK/S'], ...response.steps.map((s) => [
      String(s.step), s.epoch.toFixed(2), s.loss.toFixed(4), s.gradNorm.toFixed(3), s.learningRate.toExponential(2), s.tokensPerSecond.toFixed(0),
    ])])}`;
  }
  for (const e of response.evaluations) out += `eval after step ${e.step}: loss ${e.loss.toFixed(4)}\n`;
  return out;
}

export function describeModel(info: GetModelInfoResponse): string {
  const a = info.architecture;
  const m = info.memory;
  const l = info.limits;
  const lines = [
    `model        ${info.modelName} (${info.sourceDtype} weights, ${enumLabel(Quantization[info.quantization] ?? '', 'QUANTIZATION_')} in memory)`,
  ];
  if (a) lines.push(`architecture ${a.numLayers} layers, hidden ${a.hiddenSize}, mlp ${a.intermediateSize}, heads ${a.numAttentionHeads}/${a.numKeyValueHeads} × ${a.headDim}, vocab ${a.vocabSize}, context ${a.maxPositionEmbeddings}`);
  lines.push(`device       ${info.device}`);
  if (m) lines.push(`memory       weights ${formatBytes(m.weightsBytes)}, adapters ${formatBytes(m.adapterPoolBytes)}, kv cache ${formatBytes(m.kvCacheBytes)}, free ${formatBytes(m.deviceFreeBytes)} of ${formatBytes(m.deviceTotalBytes)}`);
  if (l) lines.push(`limits       max_seq_len ${l.maxSeqLen}, adapter slots ${l.adapterSlotsUsed}/${l.adapterSlots}, ${l.maxConcurrentGenerations} concurrent generations, ${l.maxQueuedJobs} queued jobs`);
  lines.push(`fingerprint  ${info.baseFingerprint}`, `chat         ${info.hasChatTemplate ? 'yes' : 'no'}`, `scheduling   ${info.scheduling}`, `server       ${info.serverVersion}`);
  return `${lines.join('\n')}\n`;
}
