// tuneserve.v1.GenerationService: Generate. Validates the prompt and sampling parameters, resolves
// the adapter reference to one version and leases it (the engine loads it into a slot, waiting when
// none is free), runs the engine, turns token ids into
// UTF-8-safe text deltas, cuts at stop sequences, and streams with backpressure: while the client
// reads slowly, deltas merge instead of queueing, so the engine never waits on the network.
// Spans under the RPC's: generate.acquire_adapter (resolving the reference and leasing the version),
// generate.prefill (engine call to first token: the engine's wait for the adapter's slot and its own
// batching wait are inside it, as it does not report when a request joins a batch) and
// generate.decode (first token to end).

import { randomInt } from 'node:crypto';
import {
  FinishReason,
  type GenerateRequest,
  type GenerateResponse,
  type GenerationServiceServer,
} from '../gen/tuneserve/v1/generation.js';
import type { ServiceContext } from './context.js';
import type { AdapterLease } from './adapter-registry.js';
import type { ChatMessage, GenerateResult, ModelInfo, TokenizerPort } from './engine-port.js';
import { failedPrecondition, invalidArgument, isEngineError, resourceExhausted, ServiceError } from './errors.js';
import { requireUse } from './auth.js';
import { requireAdapterRef } from './ids.js';
import type { RpcRunner } from './rpc.js';
import { StopMatcher } from './stop-sequences.js';
import { CoalescingWriter } from './streams.js';

const SERVICE = 'GenerationService';
const MAX_PROMPT_BYTES = 1024 * 1024;
const MAX_CHAT_MESSAGES = 512;
const CHAT_ROLES = new Set(['system', 'user', 'assistant', 'tool', 'ipython']);
const MAX_STOP_SEQUENCES = 8;
const MAX_STOP_SEQUENCE_LENGTH = 256;
const DEFAULT_MAX_TOKENS = 256;

/** The prompt as token ids, and which field carried it (for errors and metrics). */
interface Prompt {
  ids: Int32Array;
  field: 'text' | 'chat' | 'token_ids';
}

/** Encodes whichever prompt the request carries; INVALID_ARGUMENT naming the field. */
function promptOf(request: GenerateRequest, tokenizer: TokenizerPort, info: ModelInfo): Prompt {
  const given = [request.text !== undefined, request.chat !== undefined, request.tokenIds !== undefined].filter(Boolean);
  if (given.length !== 1) throw invalidArgument('prompt', 'set exactly one of text, chat or token_ids');
  let prompt: Prompt;
  if (request.text !== undefined) {
    if (Buffer.byteLength(request.text) > MAX_PROMPT_BYTES) throw invalidArgument('text', `must be at most ${MAX_PROMPT_BYTES} bytes`);
    prompt = { ids: Int32Array.from(tokenizer.encode(request.text, { addBos: true })), field: 'text' };
  } else if (request.chat !== undefined) {
    const messages = request.chat.messages;
    if (messages.length === 0 || messages.length > MAX_CHAT_MESSAGES) {
      throw invalidArgument('chat.messages', `must hold 1 to ${MAX_CHAT_MESSAGES} messages`);
    }
    let bytes = 0;
    messages.forEach((message, index) => {
      if (!CHAT_ROLES.has(message.role)) {
        throw invalidArgument(`chat.messages[${index}].role`, `${JSON.stringify(message.role)} is not one of ${[...CHAT_ROLES].join(', ')}`);
      }
      bytes += Buffer.byteLength(message.content);
    });
    if (bytes > MAX_PROMPT_BYTES) throw invalidArgument('chat.messages', `content must total at most ${MAX_PROMPT_BYTES} bytes`);
    if (!tokenizer.hasChatTemplate) {
      throw failedPrecondition('NO_CHAT_TEMPLATE', 'the model has no chat template; send text or token_ids');
    }
    const chat: ChatMessage[] = messages.map((m) => ({ role: m.role, content: m.content }));
    try {
      prompt = { ids: Int32Array.from(tokenizer.encodeChat(chat, { addGenerationPrompt: true })), field: 'chat' };
    } catch (error) {
      if (isEngineError(error) && error.code === 'INVALID_ARGUMENT') throw invalidArgument('chat.messages', error.message);
      throw error;
    }
  } else {
    const ids = request.tokenIds?.ids ?? [];
    if (ids.length === 0) throw invalidArgument('token_ids.ids', 'must hold at least one token id');
    const vocabSize = info.config.vocabSize;
    const bad = ids.findIndex((id) => id >= vocabSize);
    if (bad !== -1) throw invalidArgument(`token_ids.ids[${bad}]`, `is ${ids[bad]}, not below vocab_size ${vocabSize}`);
    prompt = { ids: Int32Array.from(ids), field: 'token_ids' };
  }
  if (prompt.ids.length >= info.maxSeqLen) {
    throw invalidArgument(prompt.field, `is ${prompt.ids.length} tokens; the model takes at most ${info.maxSeqLen - 1}`);
  }
  return prompt;
}

/** Resolves an optional number with a default and a range; INVALID_ARGUMENT naming the field. */
function parameter(field: string, value: number | undefined, fallback: number, ok: (v: number) => boolean, range: string): number {
  const resolved = value ?? fallback;
  if (!Number.isFinite(resolved) || !ok(resolved)) throw invalidArgument(field, `must be ${range}, got ${resolved}`);
  return resolved;
}

/** Merges a newer delta into an older unsent one. */
function mergeDeltas(older: GenerateResponse, newer: GenerateResponse): GenerateResponse {
  return {
    text: older.text + newer.text,
    tokenIds: older.tokenIds.concat(newer.tokenIds),
    finishReason: newer.finishReason,
    usage: newer.usage ?? older.usage,
    adapterVersion: newer.adapterVersion || older.adapterVersion,
  };
}

/** The GenerationService handlers. */
export function generationService(context: ServiceContext, rpc: RpcRunner): GenerationServiceServer {
  const { adapters, limits, telemetry, generations } = context;

  return {
    generate: rpc.serverStream<GenerateRequest, GenerateResponse>(SERVICE, 'Generate', async (request, writer, call) => {
      const { watch } = call;
      const started = performance.now();
      const engine = context.engine();
      const info = engine.modelInfo();
      const tokenizer = engine.tokenizer;

      // Validate.
      const ref = request.adapterId === '' ? null : requireAdapterRef(request.adapterId, 'adapter_id');
      const adapterId = ref === null ? null : ref.adapterId;
      call.annotate({ 'tuneserve.adapter': adapterId ?? '' });
      const prompt = promptOf(request, tokenizer, info);
      const room = info.maxSeqLen - prompt.ids.length;
      const maxTokens = request.maxTokens === 0 ? Math.min(DEFAULT_MAX_TOKENS, room) : request.maxTokens;
      if (maxTokens > room) {
        throw invalidArgument('max_tokens', `is ${maxTokens} but only ${room} tokens fit after the ${prompt.ids.length}-token prompt`);
      }
      const temperature = parameter('temperature', request.temperature, 1, (v) => v >= 0 && v <= 5, 'from 0 to 5');
      const topP = parameter('top_p', request.topP, 1, (v) => v > 0 && v <= 1, 'above 0 and at most 1');
      const repetitionPenalty = parameter('repetition_penalty', request.repetitionPenalty, 1, (v) => v > 0 && v <= 10, 'above 0 and at most 10');
      if (request.topK > info.config.vocabSize) throw invalidArgument('top_k', `must be at most vocab_size ${info.config.vocabSize}`);
      if (request.stopSequences.length > MAX_STOP_SEQUENCES) {
        throw invalidArgument('stop_sequences', `must hold at most ${MAX_STOP_SEQUENCES} sequences`);
      }
      request.stopSequences.forEach((stop, index) => {
        if (stop.length === 0 || stop.length > MAX_STOP_SEQUENCE_LENGTH) {
          throw invalidArgument(`stop_sequences[${index}]`, `must be 1 to ${MAX_STOP_SEQUENCE_LENGTH} characters`);
        }
      });

      // Admit: a generation slot, then the adapter (pinned while it is used).
      if (generations.active >= limits.maxConcurrentGenerations) {
        throw resourceExhausted(
          'GENERATION_CAPACITY',
          `the server is serving its maximum of ${limits.maxConcurrentGenerations} generations`,
          1000,
          { max_concurrent_generations: String(limits.maxConcurrentGenerations) },
        );
      }
      generations.active += 1;
      let lease: AdapterLease | null = null;
      let firstTokenAt: number | null = null;
      let result: GenerateResult | null = null;
      let errorType: string | null = null;
      let phase = call.startSpan('generate.acquire_adapter', { 'tuneserve.adapter': adapterId ?? '' });
      try {
        if (ref !== null) {
          requireUse(call.principal, 'adapter', ref.adapterId, await adapters.get(ref.adapterId));
          // Resolved here, once: the request finishes on this version whatever moves meanwhile.
          lease = await adapters.lease(ref);
          call.annotate({ 'tuneserve.adapter.version': lease.version });
        }
        phase.end();
        phase = call.startSpan('generate.prefill', { 'tuneserve.adapter': adapterId ?? '', 'gen_ai.usage.input_tokens': prompt.ids.length });

        // Run the engine, streaming text as it comes.
        const detokenizer = tokenizer.createDetokenizer();
        const stops = new StopMatcher(request.stopSequences);
        const deltas = new CoalescingWriter<GenerateResponse>(writer, mergeDeltas);
        const stopSequence = new AbortController();
        const signal = AbortSignal.any([watch.signal, stopSequence.signal]);
        const pushText = (text: string, ids: readonly number[]): boolean => {
          const { emit, stopped } = stops.push(text);
          const tokenIds = request.returnTokenIds ? [...ids] : [];
          if (emit !== '' || tokenIds.length > 0) {
            deltas.push({ text: emit, tokenIds, finishReason: FinishReason.FINISH_REASON_UNSPECIFIED, usage: undefined, adapterVersion: 0 });
          }
          return stopped;
        };
        const generating = engine.generate(
          {
            promptIds: prompt.ids,
            adapter: lease?.key ?? null,
            maxTokens,
            temperature,
            topK: request.topK,
            topP,
            repetitionPenalty,
            seed: request.seed ?? randomInt(0, 2 ** 32 - 1),
            stopIds: request.ignoreEos ? [] : tokenizer.eosIds,
          },
          {
            signal,
            onTokens: (ids) => {
              if (stopSequence.signal.aborted || ids.length === 0) return;
              if (firstTokenAt === null) {
                firstTokenAt = performance.now();
                phase.end();
                phase = call.startSpan('generate.decode', { 'tuneserve.adapter': adapterId ?? '' });
              }
              if (pushText(detokenizer.push(ids), ids)) stopSequence.abort();
            },
          },
        );
        result = await generating.catch((error: unknown) => {
          throw lease === null ? error : adapters.loadFailure(error, { adapterId: lease.adapterId, version: lease.version });
        });
        watch.throwIfStopped();

        // Finish: the held-back text, the reason and the usage.
        let finishReason: FinishReason;
        if (stopSequence.signal.aborted) {
          finishReason = FinishReason.FINISH_REASON_STOP_SEQUENCE;
        } else {
          const stoppedAtEnd = pushText(detokenizer.flush(), []);
          if (stoppedAtEnd) finishReason = FinishReason.FINISH_REASON_STOP_SEQUENCE;
          else if (result.finishReason === 'stop') finishReason = FinishReason.FINISH_REASON_STOP;
          else if (result.finishReason === 'length') finishReason = FinishReason.FINISH_REASON_LENGTH;
          else throw new Error('the engine reported a cancellation nobody asked for');
        }
        const tail = stopSequence.signal.aborted || finishReason === FinishReason.FINISH_REASON_STOP_SEQUENCE ? '' : stops.flush();
        deltas.push({
          text: tail,
          tokenIds: [],
          finishReason,
          usage: {
            promptTokens: result.promptTokens,
            completionTokens: result.completionTokens,
            totalTokens: result.promptTokens + result.completionTokens,
          },
          adapterVersion: lease?.version ?? 0,
        });
        await deltas.flush();
      } catch (error) {
        errorType = error instanceof ServiceError ? error.reason : isEngineError(error) ? error.code : 'INTERNAL';
        if (watch.outcome !== null) errorType = watch.outcome === 'deadline' ? 'DEADLINE_EXCEEDED' : 'CANCELLED';
        throw error;
      } finally {
        phase.setAttribute('gen_ai.usage.output_tokens', result?.completionTokens ?? 0);
        phase.end();
        lease?.release();
        generations.active -= 1;
        const finished = performance.now();
        const completionTokens = result?.completionTokens ?? 0;
        telemetry.recordGeneration({
          operation: prompt.field === 'chat' ? 'chat' : 'text_completion',
          adapter: adapterId ?? '',
          tenant: call.principal.tenant,
          model: info.name,
          timeToFirstToken: firstTokenAt === null ? null : (firstTokenAt - started) / 1000,
          timePerOutputToken:
            firstTokenAt === null || completionTokens < 2 ? null : (finished - firstTokenAt) / 1000 / (completionTokens - 1),
          duration: (finished - started) / 1000,
          inputTokens: result?.promptTokens ?? prompt.ids.length,
          outputTokens: completionTokens,
          errorType,
        });
      }
    }),
  };
}
