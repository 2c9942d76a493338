// The model's chat template (tokenizer_config.json's chat_template, rendered with @huggingface/jinja)
// turned into token ids, with the tokens of every assistant turn located. Generate's chat prompt and
// training's chat rows both come from encode() here, so they cannot drift apart.
//
// Message content is literal text: "<|eot_id|>" typed by a user is never the control token. The
// template is rendered twice, once with the real contents and once with a sentinel per message; the
// sentinel rendering says which characters of the real one came from a message. Control tokens are
// parsed only in the template's own text, and each run of text between control tokens is encoded as
// plain text (template text and contents together, exactly as the rendered string reads).
//
// Assistant turns, without {% generation %} markers: for assistant message k, the turn starts where
// the rendering of messages[0..k) with the generation prompt ends (that prompt is what Generate
// sends), and ends with the first control token the template writes after the message's content
// (<|eot_id|>, or <|eom_id|> for a Llama 3.1 tool call). Both ends are checked to fall on token
// boundaries of the whole conversation, so the prompt's ids are exactly a prefix of the training
// ids; a template that breaks that (or hides or rewrites the content) is refused with a message
// saying why.

import { Template } from '@huggingface/jinja';
import { EngineError } from './errors.js';

export interface ChatMessage {
  role: string;
  content: string;
}

/** Roles a conversation may use (ipython and tool: Llama 3.1 tool output). */
export const CHAT_ROLES = ['system', 'user', 'assistant', 'ipython', 'tool'] as const;

export interface ChatEncoding {
  ids: number[];
  /** Per token: true for the tokens an assistant turn produces (its content and its end-of-turn token). */
  assistantMask: boolean[];
}

/** What the encoder needs from the tokenizer. */
export interface TemplateTokenizer {
  /** Plain text → ids, special-token strings included as text. */
  encodeLiteral(text: string): number[];
  /** The control tokens (added tokens) by their text. */
  controlTokens: ReadonlyMap<string, number>;
  /** <|begin_of_text|>: a rendering that does not start with it gets one. */
  bos: number;
}

/**
 * Llama 3's chat format (REFERENCE.md) as a template, for tokenizer_config.json files that carry
 * none: Meta's Llama 3 template in the later form that honours add_generation_prompt.
 */
export const LLAMA3_CHAT_TEMPLATE =
  "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/** A run of the rendered text: from the template itself, or a message's content. */
interface Piece {
  text: string;
  /** Index of the message whose content this is; null for template text. */
  message: number | null;
  /** Offsets of the piece in the sentinel rendering and in the real one. */
  sentinelStart: number;
  realStart: number;
}

/** A run of ids: one control token, or the plain text between two of them. */
interface Segment {
  realStart: number;
  realEnd: number;
  idStart: number;
  idEnd: number;
  control: boolean;
}

/** Private-use characters, one of which (absent from the template and every content) marks contents. */
const MARKER_CANDIDATES = ['\u{F0000}', '\u{F0001}', '\u{F0002}', '\u{F0003}', '\u{100000}', '\u{100001}'];

export class ChatTemplate {
  private readonly template: Template;
  private readonly controlPattern: RegExp;

  constructor(
    readonly source: string,
    private readonly variables: { bos_token: string; eos_token: string },
    private readonly tokenizer: TemplateTokenizer,
  ) {
    try {
      // transformers' {% generation %} markers only mark assistant text; rendering ignores them.
      this.template = new Template(
        source
          .replace(/\{%(-?)\s*generation\s*(-?)%\}/g, '{%$1 if true $2%}')
          .replace(/\{%(-?)\s*endgeneration\s*(-?)%\}/g, '{%$1 endif $2%}'),
      );
    } catch (error) {
      throw new EngineError('INVALID_CONFIG', `tokenizer_config.json: chat_template cannot be parsed: ${(error as Error).message}`, { field: 'chat_template' }, { cause: error });
    }
    const tokens = [...tokenizer.controlTokens.keys()].sort((a, b) => b.length - a.length);
    this.controlPattern = new RegExp(tokens.map(escapeRegExp).join('|'), 'g');
  }

  /** The rendered text (special-token strings in contents are indistinguishable here: use encode). */
  render(messages: readonly ChatMessage[], addGenerationPrompt: boolean): string {
    try {
      return this.template.render({
        messages: messages.map(({ role, content }) => ({ role, content })),
        ...this.variables,
        add_generation_prompt: addGenerationPrompt,
      });
    } catch (error) {
      throw new EngineError('INVALID_ARGUMENT', `the chat template refused the messages: ${(error as Error).message}`, { field: 'messages' }, { cause: error });
    }
  }

  /** Token ids of the conversation and which of them the assistant turns produce. */
  encode(messages: readonly ChatMessage[], options: { addGenerationPrompt: boolean }): ChatEncoding {
    const marker = MARKER_CANDIDATES.find((c) => !this.source.includes(c) && messages.every((m) => !m.content.includes(c)));
    if (marker === undefined) throw new EngineError('INVALID_ARGUMENT', 'message content uses every private-use marker character the chat encoder can use', { field: 'messages' });
    const sentinel = (index: number) => `${marker}${index}${marker}`;
    const sentinelMessages = messages.map((m, index) => ({ role: m.role, content: sentinel(index) }));

    const real = this.render(messages, options.addGenerationPrompt);
    const structure = this.render(sentinelMessages, options.addGenerationPrompt);
    const pieces = locateContents(structure, real, messages, marker);
    let { ids, segments } = this.tokenize(pieces, real);
    // Exactly one BOS at the start, whether or not the template writes one.
    let shift = 0;
    while (ids[shift] === this.tokenizer.bos && ids[shift + 1] === this.tokenizer.bos) shift++;
    if (shift > 0) {
      ids = ids.slice(shift);
      segments = segments.slice(shift).map((s) => ({ ...s, idStart: s.idStart - shift, idEnd: s.idEnd - shift }));
    } else if (ids[0] !== this.tokenizer.bos) {
      ids = [this.tokenizer.bos, ...ids];
      segments = segments.map((s) => ({ ...s, idStart: s.idStart + 1, idEnd: s.idEnd + 1 }));
    }

    const assistantMask = ids.map(() => false);
    messages.forEach((message, k) => {
      if (message.role !== 'assistant') return;
      const where = `messages[${k}] (assistant)`;
      // Start: the end of the prompt Generate would send for messages[0..k).
      let sentinelStart: number;
      if (k === 0) {
        const first = pieces.find((p) => p.message === 0);
        if (first === undefined) throw unlocatable(`${where}: the template does not render its content`);
        sentinelStart = first.sentinelStart;
      } else {
        const prompt = this.render(sentinelMessages.slice(0, k), true);
        if (!structure.startsWith(prompt) || !real.startsWith(this.render(messages.slice(0, k), true))) {
          throw unlocatable(`${where}: the generation prompt for the messages before it is not a prefix of the conversation, so its turn cannot be told apart`);
        }
        sentinelStart = prompt.length;
      }
      // End: the first control token the template writes after the content.
      const content = pieces.find((p) => p.message === k && p.sentinelStart >= sentinelStart);
      if (content === undefined) throw unlocatable(`${where}: the template does not render its content after the prompt`);
      let sentinelEnd: number | null = null;
      for (const piece of pieces) {
        if (piece.message !== null || piece.sentinelStart < content.sentinelStart) continue;
        this.controlPattern.lastIndex = 0;
        const match = this.controlPattern.exec(piece.text);
        if (match !== null) {
          sentinelEnd = piece.sentinelStart + match.index + match[0].length;
          break;
        }
      }
      if (sentinelEnd === null) throw unlocatable(`${where}: no control token (such as <|eot_id|>) follows its content, so the end of the turn is unknown`);
      const realStart = toReal(pieces, sentinelStart);
      const realEnd = toReal(pieces, sentinelEnd);
      const first = this.tokenAt(segments, real, ids, realStart);
      const last = this.tokenAt(segments, real, ids, realEnd);
      if (first === null || last === null) {
        throw unlocatable(`${where}: its turn does not ${first === null ? 'start' : 'end'} on a token boundary (the template joins it to the neighbouring text), so the prompt's ids would not be a prefix of the conversation's`);
      }
      for (let t = first; t < last; t++) assistantMask[t] = true;
    });
    return { ids, assistantMask };
  }

  /** Ids of the rendered text: control tokens parsed in template text only, the rest plain text. */
  private tokenize(pieces: readonly Piece[], real: string): { ids: number[]; segments: Segment[] } {
    const ids: number[] = [];
    const segments: Segment[] = [];
    let textStart = 0;
    const flushText = (end: number) => {
      if (end > textStart) {
        const encoded = this.tokenizer.encodeLiteral(real.slice(textStart, end));
        segments.push({ realStart: textStart, realEnd: end, idStart: ids.length, idEnd: ids.length + encoded.length, control: false });
        ids.push(...encoded);
      }
    };
    for (const piece of pieces) {
      if (piece.message !== null) continue;
      this.controlPattern.lastIndex = 0;
      for (let match = this.controlPattern.exec(piece.text); match !== null; match = this.controlPattern.exec(piece.text)) {
        const start = piece.realStart + match.index;
        flushText(start);
        segments.push({ realStart: start, realEnd: start + match[0].length, idStart: ids.length, idEnd: ids.length + 1, control: true });
        ids.push(this.tokenizer.controlTokens.get(match[0])!);
        textStart = start + match[0].length;
      }
    }
    flushText(real.length);
    return { ids, segments };
  }

  /**
   * The index of the first token at or after character `offset` of the real rendering, when the
   * tokens split there (the text before it encodes on its own to exactly the tokens before it).
   */
  private tokenAt(segments: readonly Segment[], real: string, ids: readonly number[], offset: number): number | null {
    for (const segment of segments) {
      if (offset === segment.realStart) return segment.idStart;
      if (offset >= segment.realEnd) continue;
      if (segment.control) return null;
      const head = this.tokenizer.encodeLiteral(real.slice(segment.realStart, offset));
      const matches = head.every((id, i) => ids[segment.idStart + i] === id);
      return matches ? segment.idStart + head.length : null;
    }
    return ids.length;
  }
}

function unlocatable(problem: string): EngineError {
  return new EngineError('INVALID_ARGUMENT', `the chat template's assistant turns cannot be located: ${problem}`, { field: 'messages' });
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * Splits the sentinel rendering into template text and contents, and finds each content in the real
 * rendering. Templates commonly trim contents, so a content may appear trimmed at either end, or
 * JSON-escaped (| tojson; the quotes around it are then template text).
 */
function locateContents(structure: string, real: string, messages: readonly ChatMessage[], marker: string): Piece[] {
  const pieces: Piece[] = [];
  const refused = () => unlocatable('the template changes message content beyond trimming or JSON-escaping it, so the content cannot be found in the rendering');
  const parts = structure.split(new RegExp(`${marker}(\\d+)${marker}`, 'u'));
  let sentinelPos = 0;
  let realPos = 0;
  parts.forEach((part, i) => {
    if (i % 2 === 0) {
      if (part === '') return;
      if (!real.startsWith(part, realPos)) throw refused();
      pieces.push({ text: part, message: null, sentinelStart: sentinelPos, realStart: realPos });
      sentinelPos += part.length;
      realPos += part.length;
      return;
    }
    const index = Number(part);
    const content = messages[index]?.content;
    if (content === undefined) throw refused();
    const next = parts[i + 1] ?? '';
    const isLast = i + 1 >= parts.length - 1 && next === '';
    // As is, trimmed (Llama templates trim), or JSON-escaped inside quotes the template wrote
    // (Llama 3.1 writes tool output with | tojson).
    const candidates = [...new Set([content, content.trim(), content.trimStart(), content.trimEnd(), JSON.stringify(content).slice(1, -1)])];
    const text = candidates.find((c) => real.startsWith(c, realPos) && (isLast ? realPos + c.length === real.length : next === '' || real.startsWith(next, realPos + c.length)));
    if (text === undefined) throw refused();
    pieces.push({ text, message: index, sentinelStart: sentinelPos, realStart: realPos });
    sentinelPos += marker.length * 2 + part.length;
    realPos += text.length;
  });
  if (realPos !== real.length) throw refused();
  return pieces;
}

/** Maps an offset of the sentinel rendering that lies in template text (or at a content's start) to the real one. */
function toReal(pieces: readonly Piece[], sentinelOffset: number): number {
  let result = 0;
  for (const piece of pieces) {
    if (piece.sentinelStart > sentinelOffset) break;
    result = piece.message === null ? piece.realStart + (sentinelOffset - piece.sentinelStart) : piece.realStart;
  }
  return result;
}
