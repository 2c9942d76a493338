// The load generator (src/loadgen/load.ts) against a real server over the engine double: every
// request is accounted for (completed, cancelled, failed by code, lost, hung), a seed gives the same
// requests, and the hung and lost counters do fire when a stream stalls or ends short.

import { afterEach, describe, expect, it } from 'vitest';
import { runLoad } from '../../src/loadgen/load.js';
import { EngineDouble } from './engine-double.js';
import { importAdapter, startHarness, type Harness } from './harness.js';

describe('load generator', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  it('accounts for every request under cancels, deadlines and a full server, the same way for a seed', async () => {
    harness = await startHarness({ engine: new EngineDouble({ decodeStepMs: 3, adapterSlots: 2 }), server: { limits: { maxConcurrentGenerations: 4 } } });
    for (const id of ['a', 'b', 'c']) await importAdapter(harness.clients, id);
    const options = {
      clients: harness.clients, adapters: ['a', 'b', 'c', ''], requests: 60, ratePerSecond: 400, streams: 10, seed: 7,
      promptTokens: { min: 2, max: 20 }, maxTokens: { min: 5, max: 40 }, idBase: 32, idRange: 90, cancelFraction: 0.2, deadlineFraction: 0.2,
      deadlineMs: { min: 5, max: 60 }, expectedMsPerToken: 50,
    };
    const report = await runLoad(options);
    const failed = Object.values(report.failed).reduce((s, n) => s + n, 0);
    expect(report.sent).toBe(60);
    expect(report.completed + report.cancelled + failed + report.lost + report.hung).toBe(60);
    expect(report.lost).toBe(0);
    expect(report.hung).toBe(0);
    expect(report.cancelled).toBeGreaterThan(0);
    expect(report.failed.DEADLINE_EXCEEDED).toBeGreaterThan(0);
    expect(report.failed.RESOURCE_EXHAUSTED).toBeGreaterThan(0);  // 10 streams, 4 admitted
    expect(report.ttftMs.count).toBeGreaterThan(0);
    expect(report.outputTokens).toBe(report.records.reduce((s, r) => s + r.tokens, 0));
    // Completed requests saw their adapter's version; the base reports 0.
    for (const r of report.records.filter((x) => x.outcome === 'completed')) expect(r.adapterVersion).toBe(r.adapter === '' ? 0 : 1);
    const again = await runLoad(options);
    expect(again.records.map((r) => [r.adapter, r.cancelAfter, r.deadlineMs])).toEqual(report.records.map((r) => [r.adapter, r.cancelAfter, r.deadlineMs]));
  });

  it('counts a stream that never ends as hung, and one that ends without its final message as lost', async () => {
    const engine = new EngineDouble({ decodeStepMs: 5000 });
    harness = await startHarness({ engine, allowErrorLogs: true });
    const hung = await runLoad({
      clients: harness.clients, adapters: [''], requests: 2, ratePerSecond: 100, streams: 2, seed: 1,
      promptTokens: { min: 2, max: 2 }, maxTokens: { min: 3, max: 3 }, idBase: 32, idRange: 90, expectedMsPerToken: 1, hungGraceMs: 100,
    });
    expect(hung).toMatchObject({ sent: 2, hung: 2, completed: 0, lost: 0 });
    // A server that ends the stream early (an engine result counting more tokens than were streamed).
    engine.settings.decodeStepMs = 0;
    const original = engine.generate.bind(engine);
    engine.generate = async (spec, options) => {
      const result = await original(spec, { ...options, onTokens: () => {} });
      return result;
    };
    const lost = await runLoad({
      clients: harness.clients, adapters: [''], requests: 3, ratePerSecond: 100, streams: 3, seed: 2,
      promptTokens: { min: 2, max: 2 }, maxTokens: { min: 3, max: 3 }, idBase: 32, idRange: 90,
    });
    expect(lost).toMatchObject({ sent: 3, lost: 3, completed: 0, hung: 0 });
  });
});
