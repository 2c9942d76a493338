// Generate over gRPC with the engine test double: deltas that concatenate to the scripted text,
// finish reasons and usage, stop sequences, the three prompt forms, per-request adapters,
// cancellation and deadlines that stop the engine, and backpressure that merges deltas while the
// client does not read.

import { Metadata, status, type ClientReadableStream } from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import { FinishReason, GenerateRequest, type GenerateResponse } from '../../src/gen/tuneserve/v1/generation.js';
import { BOS, EngineDouble, EOT, WIDE, WIDE_TEXT } from './engine-double.js';
import { call, collect, eventually, expectError, importAdapter, startHarness, type Harness } from './harness.js';
import { TestMetricReader } from './metric-reader.js';

const request = (fields: Partial<GenerateRequest>): GenerateRequest => GenerateRequest.fromPartial(fields);
const text = (messages: GenerateResponse[]): string => messages.map((m) => m.text).join('');

describe('generation', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  it('streams the completion as deltas and ends with the finish reason and usage', async () => {
    harness = await startHarness();
    const { messages, error } = await collect(harness.clients.generation.generate(request({ text: 'Hello', returnTokenIds: true })));
    expect(error).toBeNull();
    expect(text(messages)).toBe('[base] Hello');
    const last = messages.at(-1);
    expect(last?.finishReason).toBe(FinishReason.FINISH_REASON_STOP);
    // Prompt: BOS + 5 bytes; completion: 12 bytes + EOT.
    expect(last?.usage).toEqual({ promptTokens: 6, completionTokens: 13, totalTokens: 19 });
    expect(messages.slice(0, -1).every((m) => m.finishReason === FinishReason.FINISH_REASON_UNSPECIFIED && m.usage === undefined)).toBe(true);
    expect(messages.flatMap((m) => m.tokenIds).at(-1)).toBe(EOT);
    expect(harness.engine.records.generations[0]?.promptIds[0]).toBe(BOS);
  });

  it('stops at max_tokens with LENGTH, and ignores EOS when asked', async () => {
    harness = await startHarness();
    const short = await collect(harness.clients.generation.generate(request({ text: 'Hi', maxTokens: 4 })));
    expect(text(short.messages)).toBe('[bas');
    expect(short.messages.at(-1)?.finishReason).toBe(FinishReason.FINISH_REASON_LENGTH);
    const long = await collect(harness.clients.generation.generate(request({ text: 'Hi', maxTokens: 20, ignoreEos: true })));
    expect(long.messages.at(-1)?.usage?.completionTokens).toBe(20);
    // 20 tokens: "[base] Hi" (9), EOT (no text), "[base] Hi" (9), EOT.
    expect(text(long.messages)).toBe('[base] Hi[base] Hi');
  });

  it('cuts at a stop sequence split across tokens and sends none of it', async () => {
    harness = await startHarness();
    const { messages } = await collect(harness.clients.generation.generate(request({ text: 'abc', stopSequences: ['e] a', 'zzz'] })));
    expect(text(messages)).toBe('[bas');
    expect(messages.at(-1)?.finishReason).toBe(FinishReason.FINISH_REASON_STOP_SEQUENCE);
    expect(harness.engine.records.results[0]?.finishReason).toBe('cancelled');
  });

  it('sends a character split across tokens whole (UTF-8 safe deltas)', async () => {
    harness = await startHarness({ engine: new EngineDouble({ script: () => 'añ€😀!' }) });
    const { messages } = await collect(harness.clients.generation.generate(request({ text: 'x' })));
    expect(text(messages)).toBe('añ€😀!');
    for (const message of messages) expect(message.text).not.toContain('\uFFFD');
  });

  it('accepts chat messages and token ids', async () => {
    harness = await startHarness();
    const chat = await collect(
      harness.clients.generation.generate(request({ chat: { messages: [{ role: 'user', content: 'What is up' }] } })),
    );
    expect(text(chat.messages)).toBe('[base] \nassistant: ');
    const ids = await collect(harness.clients.generation.generate(request({ tokenIds: { ids: [104, 105] } })));
    expect(text(ids.messages)).toBe('[base] hi');
    expect(harness.engine.records.generations[1]?.promptIds).toEqual(Int32Array.from([104, 105]));
  });

  it('gives concurrent requests their own adapter (or none)', async () => {
    harness = await startHarness({ engine: new EngineDouble({ decodeStepMs: 2 }) });
    const { clients } = harness;
    for (const id of ['alpha', 'beta']) await importAdapter(clients, id);
    const [a, b, none] = await Promise.all(
      ['alpha', 'beta', ''].map((adapterId) => collect(clients.generation.generate(request({ text: 'same prompt', adapterId })))),
    );
    // The engine sees each adapter's version key (the double prints it).
    expect(text(a?.messages ?? [])).toBe('[alpha@v1] same prompt');
    expect(text(b?.messages ?? [])).toBe('[beta@v1] same prompt');
    expect(a?.messages.at(-1)?.adapterVersion).toBe(1);
    expect(none?.messages.at(-1)?.adapterVersion).toBe(0);
    expect(text(none?.messages ?? [])).toBe('[base] same prompt');
    const { adapters } = await call(clients.adapters.listAdapters, clients.adapters, { pageSize: 0, pageToken: '', loadedOnly: true });
    expect(adapters.map((x) => x.adapterId)).toEqual(['alpha', 'beta']);
  });

  it('stops the engine within one step when the client cancels, and frees the slot', async () => {
    harness = await startHarness({
      engine: new EngineDouble({ decodeStepMs: 10, script: () => 'x'.repeat(10_000) }),
      server: { limits: { maxConcurrentGenerations: 1 } },
    });
    const { clients, engine } = harness;
    const stream = clients.generation.generate(request({ text: 'go', maxTokens: 5000 }));
    await new Promise<void>((resolve) => stream.once('data', () => resolve()));
    stream.on('error', () => {});
    stream.cancel();
    await eventually(() => engine.records.results.length === 1);
    const result = engine.records.results[0];
    expect(result?.finishReason).toBe('cancelled');
    expect(result?.completionTokens).toBeLessThan(100);
    expect(engine.records.tokensAfterAbort[0]).toBe(0);
    // The single generation slot is free again.
    await eventually(async () => {
      const next = await collect(clients.generation.generate(request({ text: 'again', maxTokens: 3 })));
      return next.error === null;
    });
  });

  it('honours the client deadline: DEADLINE_EXCEEDED and the engine stops', async () => {
    harness = await startHarness({ engine: new EngineDouble({ decodeStepMs: 10, script: () => 'y'.repeat(10_000) }) });
    const { clients, engine } = harness;
    const started = Date.now();
    const { error } = await collect(
      clients.generation.generate(request({ text: 'slow', maxTokens: 5000 }), new Metadata(), { deadline: Date.now() + 300 }),
    );
    expectError(error, status.DEADLINE_EXCEEDED);
    await eventually(() => engine.records.results.length === 1);
    expect(engine.records.results[0]?.finishReason).toBe('cancelled');
    // 300 ms at 10 ms per token is ~30 tokens; generous bound for a loaded CI machine.
    expect(engine.records.results[0]?.completionTokens).toBeLessThan(200);
    expect(Date.now() - started).toBeLessThan(3000);
  });

  it('merges deltas while the client is not reading (backpressure) and loses no text', async () => {
    // 3,000 tokens, half of them 1 KiB of text each: 1.5 MiB, far beyond the HTTP/2 stream window (64 KiB), so
    // with the client paused the server's writes must wait for 'drain'.
    const reader = new TestMetricReader();
    harness = await startHarness({
      engine: new EngineDouble({ scriptIds: () => [WIDE], tokensPerStep: 4 }),
      server: { metricReaders: [reader] },
    });
    const stream: ClientReadableStream<GenerateResponse> = harness.clients.generation.generate(
      request({ text: 'p', maxTokens: 3000, ignoreEos: true }),
    );
    // Stop reading after the first message. (A grpc-js client stream paused before its first read
    // keeps draining the connection into memory; one paused after a read stops the HTTP/2 stream.)
    const messages: GenerateResponse[] = [];
    stream.on('data', (m: GenerateResponse) => {
      messages.push(m);
      if (messages.length === 1) stream.pause();
    });
    const done = new Promise<void>((resolve, reject) => {
      stream.on('end', () => resolve());
      stream.on('error', reject);
    });
    // The engine finishes while the client reads nothing: it is never held up by the network.
    await eventually(() => harness?.engine.records.results.length === 1);
    expect(await reader.counterTotal('tuneserve.stream.drain_waits')).toBeGreaterThan(0);
    stream.resume();
    await done;
    // Every token's text arrives exactly once: the script alternates WIDE and EOT (kept, as
    // ignore_eos is set, and textless), so 1500 of the 3000 tokens carry 1 KiB each.
    const all = messages.map((m) => m.text).join('');
    expect(all.length).toBe(WIDE_TEXT.length * 1500);
    expect(all === WIDE_TEXT.repeat(1500)).toBe(true);
    // 3000 tokens in 750 engine steps, but merged into far fewer messages while blocked.
    expect(messages.length).toBeLessThan(750);
    expect(messages.at(-1)?.finishReason).toBe(FinishReason.FINISH_REASON_LENGTH);
    expect(messages.at(-1)?.usage?.completionTokens).toBe(3000);
  });

  it('refuses bad parameters with INVALID_ARGUMENT naming the field', async () => {
    harness = await startHarness();
    const g = harness.clients.generation;
    const cases: [Partial<GenerateRequest>, string][] = [
      [{}, 'prompt'],
      [{ text: 'a', tokenIds: { ids: [1] } }, 'prompt'],
      [{ text: 'a', temperature: -1 }, 'temperature'],
      [{ text: 'a', topP: 0 }, 'top_p'],
      [{ text: 'a', repetitionPenalty: 0 }, 'repetition_penalty'],
      [{ text: 'a', topK: 100_000 }, 'top_k'],
      [{ text: 'a', maxTokens: 9000 }, 'max_tokens'],
      [{ text: 'a', stopSequences: [''] }, 'stop_sequences[0]'],
      [{ text: 'a', stopSequences: Array(9).fill('x') }, 'stop_sequences'],
      [{ tokenIds: { ids: [] } }, 'token_ids.ids'],
      [{ tokenIds: { ids: [1, 300] } }, 'token_ids.ids[1]'],
      [{ chat: { messages: [] } }, 'chat.messages'],
      [{ chat: { messages: [{ role: 'robot', content: 'x' }] } }, 'chat.messages[0].role'],
      [{ text: 'x'.repeat(9000) }, 'text'],
      [{ text: 'a', adapterId: '../x' }, 'adapter_id'],
    ];
    for (const [fields, field] of cases) {
      const { error } = await collect(g.generate(request(fields)));
      expectError(error, status.INVALID_ARGUMENT, { field });
    }
    expect(harness.engine.records.generations).toHaveLength(0);
  });
});
