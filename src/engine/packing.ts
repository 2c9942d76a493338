// Packing: short training rows placed one after another into sequences of up to maxSeqLen tokens, so
// a batch carries tokens instead of padding. Each packed sequence lists, per token, where its document
// starts (docStart); the engine then restricts attention to the document (a block-diagonal causal
// mask), restarts positions at 0 for each document, and does not score a document's last token against
// the next document's first. A packed row's loss and gradients are therefore those of the row alone
// (test/packing.test.ts checks it against unpacked runs); what changes is how many rows a batch holds.
//
// Placement is first-fit decreasing (longest rows first, each into the first sequence with room),
// deterministic for a given row list, so a resumed job packs identically.

import { EngineError } from './errors.js';
import type { NativeTrainExample } from './native.js';

/** A packing decision, for the dataset report. */
export interface PackingReport {
  /** Whether the training rows were packed. */
  enabled: boolean;
  /** Why: the setting, or what `auto` saw. */
  reason: string;
  /** Training sequences the job runs: packed sequences, or the rows themselves when not packed. */
  sequences: number;
  /** Training rows placed into them. */
  rows: number;
  /** Tokens over sequences × maxSeqLen: how full the packed sequences are (1 when unpacked rows are all maxSeqLen long). */
  fill: number;
}

export interface PackingOptions {
  /** true / false force it; undefined is auto (see decidePacking). */
  packing: boolean | undefined;
  /** Length of a packed sequence (the job's max_seq_len). */
  maxSeqLen: number;
  /** Sequences of one optimizer step (batch_size × grad_accum). */
  sequencesPerStep: number;
  /** The job runs a fixed number of steps (max_steps) rather than epochs. */
  fixedSteps: boolean;
}

/** Places rows into sequences of at most maxSeqLen tokens; returns the row indices of each sequence. */
export function packRows(lengths: readonly number[], maxSeqLen: number): number[][] {
  if (!Number.isSafeInteger(maxSeqLen) || maxSeqLen < 1) throw new EngineError('INVALID_ARGUMENT', `maxSeqLen must be a positive integer, got ${maxSeqLen}`, { field: 'max_seq_len' });
  const order = lengths.map((_, i) => i).sort((a, b) => lengths[b]! - lengths[a]! || a - b);
  const bins: { rows: number[]; free: number }[] = [];
  for (const row of order) {
    const length = lengths[row]!;
    if (length > maxSeqLen || length < 1) throw new EngineError('INVALID_ARGUMENT', `row ${row} has ${length} tokens; packing needs 1 to ${maxSeqLen}`);
    const bin = bins.find((b) => b.free >= length);
    if (bin) {
      bin.rows.push(row);
      bin.free -= length;
    } else {
      bins.push({ rows: [row], free: maxSeqLen - length });
    }
  }
  return bins.map((b) => b.rows);
}

/** Concatenates rows into one packed example. */
export function packedExample(rows: readonly NativeTrainExample[]): Required<NativeTrainExample> {
  const total = rows.reduce((n, r) => n + r.ids.length, 0);
  const ids = new Int32Array(total);
  const labels = new Int32Array(total);
  const docStart = new Int32Array(total);
  let at = 0;
  for (const r of rows) {
    if (r.docStart) throw new EngineError('INVALID_ARGUMENT', 'a row to pack is already packed');
    ids.set(r.ids, at);
    labels.set(r.labels, at);
    docStart.fill(at, at, at + r.ids.length);
    at += r.ids.length;
  }
  return { ids, labels, docStart };
}

/**
 * Decides and applies packing. Packing is exact per row, but a step then holds more rows, so `auto`
 * packs only where that keeps the job the user asked for: an epoch-based job (with max_steps, each
 * step would train several times the rows and the job would run that much longer), rows averaging at
 * least two per packed sequence (below that it gains little), and a packed set that still fills one
 * optimizer step (sequencesPerStep sequences).
 */
export function applyPacking(examples: readonly NativeTrainExample[], options: PackingOptions): { examples: NativeTrainExample[]; report: PackingReport } {
  const lengths = examples.map((e) => e.ids.length);
  const tokens = lengths.reduce((a, b) => a + b, 0);
  const unpacked = (reason: string) => ({
    examples: [...examples],
    report: { enabled: false, reason, sequences: examples.length, rows: examples.length, fill: tokens / (examples.length * options.maxSeqLen) },
  });
  if (options.packing === false) return unpacked('packing is off in the job config');
  const bins = packRows(lengths, options.maxSeqLen);
  if (options.packing === undefined) {
    if (options.fixedSteps) return unpacked('auto: the job runs a fixed max_steps, and packed steps would each train more rows');
    const perSequence = examples.length / bins.length;
    if (perSequence < 2) return unpacked(`auto: rows would average ${perSequence.toFixed(2)} per ${options.maxSeqLen}-token sequence (packing pays from 2)`);
    if (bins.length < options.sequencesPerStep) {
      return unpacked(`auto: ${bins.length} packed sequences would not fill one optimizer step of ${options.sequencesPerStep} (batch_size × grad_accum)`);
    }
  }
  const packed = bins.map((rows) => packedExample(rows.map((i) => examples[i]!)));
  return {
    examples: packed,
    report: {
      enabled: true,
      reason: options.packing === true ? 'packing is on in the job config' : `auto: ${(examples.length / bins.length).toFixed(2)} rows per sequence on average`,
      sequences: packed.length,
      rows: examples.length,
      fill: tokens / (packed.length * options.maxSeqLen),
    },
  };
}
