// The Llama 3 tokenizer: @huggingface/tokenizers on the model's own tokenizer.json and
// tokenizer_config.json, plus what the engine needs on top: exactly-one-BOS encoding, user content
// that can never become a control token, an exact token-level chat encoder with assistant masks,
// the Jinja chat template, and a streaming detokenizer that never splits a UTF-8 character.

import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { EngineError } from './errors.js';

export interface ChatMessage {
  role: string;
  content: string;
}

/** Roles the Llama 3 chat format knows (ipython: Llama 3.1 tool output). */
export const CHAT_ROLES = ['system', 'user', 'assistant', 'ipython', 'tool'] as const;

export interface SpecialTokenIds {
  /** <|begin_of_text|> */
  bos: number;
  /** tokenizer_config.json's eos_token (<|end_of_text|> for base models, <|eot_id|> for some instruct ones). */
  eos: number;
  /** <|end_of_text|> */
  endOfText: number;
  /** <|eot_id|>: ends every chat turn. */
  eot: number;
  /** <|eom_id|> (Llama 3.1+); null in the Llama 3.0 tokenizer, where id 128008 is a reserved token. */
  eom: number | null;
  startHeader: number;
  endHeader: number;
}

export interface ChatEncoding {
  ids: number[];
  /** Per token: true for the tokens an assistant turn produces (its content and its <|eot_id|>). */
  assistantMask: boolean[];
}

const SPECIAL = {
  bos: '<|begin_of_text|>',
  endOfText: '<|end_of_text|>',
  eot: '<|eot_id|>',
  eom: '<|eom_id|>',
  startHeader: '<|start_header_id|>',
  endHeader: '<|end_header_id|>',
} as const;

/** What separates a turn's header from its content in the Llama 3 format. */
const HEADER_SEPARATOR = '\n\n';

export class LlamaTokenizer {
  readonly specialIds: SpecialTokenIds;
  /** The chat template of tokenizer_config.json, or null when it has none. */
  readonly chatTemplate: string | null;
  /** Number of ids that have a token (base vocabulary plus added tokens). */
  readonly vocabSize: number;
  private readonly tokenizer: Tokenizer;
  private readonly config: Record<string, unknown>;
  private compiledTemplate: Template | null = null;
  private readonly separatorIds: number[];

  constructor(tokenizerJson: object, tokenizerConfig: Record<string, unknown>) {
    try {
      this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    } catch (error) {
      throw new EngineError('INVALID_CONFIG', `tokenizer.json could not be loaded: ${(error as Error).message}`, undefined, { cause: error });
    }
    this.config = tokenizerConfig;
    const required = (token: string, field: string): number => {
      const id = this.tokenizer.token_to_id(token);
      if (id === undefined) throw new EngineError('INVALID_CONFIG', `tokenizer.json has no ${token} token (needed as ${field}); is this a Llama 3 tokenizer?`, { token });
      return id;
    };
    const eosToken = typeof tokenizerConfig.eos_token === 'string' ? tokenizerConfig.eos_token : SPECIAL.endOfText;
    this.specialIds = {
      bos: required(SPECIAL.bos, 'bos'),
      eos: required(eosToken, 'eos'),
      endOfText: required(SPECIAL.endOfText, 'end of text'),
      eot: required(SPECIAL.eot, 'end of turn'),
      eom: this.tokenizer.token_to_id(SPECIAL.eom) ?? null,
      startHeader: required(SPECIAL.startHeader, 'chat header start'),
      endHeader: required(SPECIAL.endHeader, 'chat header end'),
    };
    this.chatTemplate = pickChatTemplate(tokenizerConfig.chat_template);
    this.vocabSize = this.tokenizer.get_vocab(true).size;
    this.separatorIds = this.encodeUserContent(HEADER_SEPARATOR);
  }

  /** Loads tokenizer.json and tokenizer_config.json from a model folder. */
  static async fromFolder(dir: string): Promise<LlamaTokenizer> {
    const read = async (name: string): Promise<Record<string, unknown>> => {
      const file = join(dir, name);
      let text: string;
      try {
        text = await readFile(file, 'utf8');
      } catch (error) {
        throw new EngineError('NOT_FOUND', `missing ${file}`, { file }, { cause: error });
      }
      try {
        const parsed: unknown = JSON.parse(text);
        if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error('not a JSON object');
        return parsed as Record<string, unknown>;
      } catch (error) {
        throw new EngineError('INVALID_CONFIG', `${file}: ${(error as Error).message}`, { file }, { cause: error });
      }
    };
    return new LlamaTokenizer(await read('tokenizer.json'), await read('tokenizer_config.json'));
  }

  /** Ids the generation loop stops on: eos, <|end_of_text|>, <|eot_id|> and <|eom_id|> when present. */
  get stopTokenIds(): number[] {
    const { eos, endOfText, eot, eom } = this.specialIds;
    return [...new Set([eos, endOfText, eot, ...(eom === null ? [] : [eom])])];
  }

  /**
   * Encodes text in which special-token strings ARE control tokens (templates, trusted prompts).
   * With addBos the result starts with exactly one <|begin_of_text|>: one is added unless the text
   * already starts with it, and repeats are collapsed. The post-processor of tokenizer.json is not
   * run (Meta's file adds BOS there, the @lenml file does not), so both files give the same ids.
   */
  encode(text: string, options: { addBos: boolean }): number[] {
    const ids = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    if (!options.addBos) return ids;
    const bos = this.specialIds.bos;
    let start = 0;
    while (ids[start] === bos) start++;
    return [bos, ...ids.slice(start)];
  }

  /**
   * Encodes untrusted text as plain text: "<|eot_id|>" typed by a user becomes the tokens of those
   * characters, never the control token. The library's encode() splits on added tokens first, so
   * this runs its normalizer → pre-tokenizer → BPE model on the whole text instead (what the Rust
   * library does with split_special_tokens). For text without special strings the ids equal encode().
   */
  encodeUserContent(text: string): number[] {
    if (text.length === 0) return [];
    const normalized = this.tokenizer.normalizer === null ? text : this.tokenizer.normalizer(text);
    const pieces = this.tokenizer.pre_tokenizer === null ? [normalized] : this.tokenizer.pre_tokenizer(normalized, { section_index: 0 });
    const tokens = this.tokenizer.model!(pieces);
    const vocabulary = this.tokenizer.model!.tokens_to_ids;
    return tokens.map((token: string) => {
      const id = vocabulary.get(token);
      if (id === undefined) throw new EngineError('INVALID_ARGUMENT', `tokenizer produced token ${JSON.stringify(token)} that has no id`);
      return id;
    });
  }

  /**
   * Decodes ids to text. Special tokens are written out unless skipSpecialTokens; ids with no token
   * are skipped (as the Rust library does). Tokenization-space cleanup is off: Llama 3's config asks
   * for it, but it rewrites " ," to "," and so loses text; decode(encode(x)) === x here.
   */
  decode(ids: readonly number[], options: { skipSpecialTokens?: boolean } = {}): string {
    const known = ids.filter((id) => Number.isInteger(id) && id >= 0 && this.tokenizer.id_to_token(id) !== undefined);
    if (known.length === 0) return '';
    return this.tokenizer.decode(known, { skip_special_tokens: options.skipSpecialTokens ?? false, clean_up_tokenization_spaces: false });
  }

  tokenToId(token: string): number | undefined {
    return this.tokenizer.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /** Renders tokenizer_config.json's chat_template with @huggingface/jinja. */
  applyChatTemplate(messages: readonly ChatMessage[], options: { addGenerationPrompt: boolean }): string {
    if (this.chatTemplate === null) throw new EngineError('INVALID_CONFIG', 'tokenizer_config.json has no chat_template');
    validateMessages(messages);
    this.compiledTemplate ??= new Template(this.chatTemplate);
    const token = (field: string) => (typeof this.config[field] === 'string' ? this.config[field] : undefined);
    return this.compiledTemplate.render({
      messages: messages.map(({ role, content }) => ({ role, content })),
      bos_token: token('bos_token') ?? SPECIAL.bos,
      eos_token: token('eos_token') ?? SPECIAL.endOfText,
      add_generation_prompt: options.addGenerationPrompt,
    });
  }

  /**
   * Builds the Llama 3 chat format from token pieces (REFERENCE.md):
   * <|begin_of_text|> then per message <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>,
   * then <|start_header_id|>assistant<|end_header_id|>\n\n when addGenerationPrompt. Headers are
   * control tokens; contents are plain text (encodeUserContent), trimmed as the Llama 3 templates
   * trim them, and encoded together with the "\n\n" before them exactly as the template text would
   * be. For ordinary content ids === encode(applyChatTemplate(...), {addBos: true}).
   */
  encodeChat(messages: readonly ChatMessage[], options: { addGenerationPrompt: boolean }): ChatEncoding {
    validateMessages(messages);
    const { bos, startHeader, endHeader, eot } = this.specialIds;
    const ids: number[] = [bos];
    const assistantMask: boolean[] = [false];
    const push = (pieceIds: readonly number[], trainable: boolean) => {
      for (const id of pieceIds) {
        ids.push(id);
        assistantMask.push(trainable);
      }
    };
    const pushHeader = (role: string) => push([startHeader, ...this.encodeUserContent(role), endHeader], false);
    for (const { role, content } of messages) {
      pushHeader(role);
      const body = this.encodeUserContent(HEADER_SEPARATOR + content.trim());
      // "\n\n" is its own pre-token when the (trimmed) content starts with a non-space, so the
      // separator's ids are a prefix of the body's; the rest is what the assistant wrote.
      const separatorLength = startsWith(body, this.separatorIds) ? this.separatorIds.length : 0;
      const trainable = role === 'assistant';
      push(body.slice(0, separatorLength), false);
      push(body.slice(separatorLength), trainable);
      push([eot], trainable);
    }
    if (options.addGenerationPrompt) {
      pushHeader('assistant');
      push(this.separatorIds, false);
    }
    return { ids, assistantMask };
  }

  /** A streaming detokenizer for this tokenizer. */
  detokenizer(options: { skipSpecialTokens?: boolean } = {}): IncrementalDetokenizer {
    return new IncrementalDetokenizer(this, options);
  }
}

function startsWith(ids: readonly number[], prefix: readonly number[]): boolean {
  return prefix.length <= ids.length && prefix.every((id, i) => ids[i] === id);
}

function pickChatTemplate(raw: unknown): string | null {
  if (typeof raw === 'string') return raw;
  // transformers also stores named templates as [{name, template}]; "default" is the chat one.
  if (Array.isArray(raw)) {
    const named = raw.find((entry) => entry !== null && typeof entry === 'object' && (entry as { name?: unknown }).name === 'default');
    const template = (named as { template?: unknown } | undefined)?.template;
    return typeof template === 'string' ? template : null;
  }
  return null;
}

function validateMessages(messages: readonly ChatMessage[]): void {
  if (!Array.isArray(messages) || messages.length === 0) throw new EngineError('INVALID_ARGUMENT', 'messages must be a non-empty list');
  messages.forEach((message, index) => {
    if (message === null || typeof message !== 'object') throw new EngineError('INVALID_ARGUMENT', `messages[${index}] must be an object with role and content`);
    if (typeof message.role !== 'string' || !(CHAT_ROLES as readonly string[]).includes(message.role)) {
      throw new EngineError('INVALID_ARGUMENT', `messages[${index}].role must be one of ${CHAT_ROLES.join(', ')}, got ${JSON.stringify(message.role)}`, { field: `messages[${index}].role` });
    }
    if (typeof message.content !== 'string') {
      throw new EngineError('INVALID_ARGUMENT', `messages[${index}].content must be a string`, { field: `messages[${index}].content` });
    }
  });
}

/**
 * Turns a stream of generated ids into text deltas. A token can end in the middle of a multi-byte
 * character (an emoji is often two or three byte-level tokens), which decodes to U+FFFD; the delta
 * is held back until the character completes. The concatenated deltas (with flush()) equal
 * decode(all ids). Method: decode a short window of recent ids, and emit what extends the text
 * already emitted from that window (text-generation-inference's decode_token).
 */
export class IncrementalDetokenizer {
  private readonly ids: number[] = [];
  /** Start of the window: ids before it are fully emitted and never decoded again. */
  private prefixOffset = 0;
  /** End of what has been emitted. */
  private readOffset = 0;
  private emitted = '';

  constructor(
    private readonly tokenizer: LlamaTokenizer,
    private readonly options: { skipSpecialTokens?: boolean } = {},
  ) {}

  /** Adds one id; returns the newly completed text ('' while a character is incomplete). */
  push(id: number): string {
    this.ids.push(id);
    const prefixText = this.decodeRange(this.prefixOffset, this.readOffset);
    const windowText = this.decodeRange(this.prefixOffset, this.ids.length);
    if (windowText.length > prefixText.length && !windowText.endsWith('\uFFFD')) {
      const delta = windowText.slice(prefixText.length);
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      this.emitted += delta;
      return delta;
    }
    return '';
  }

  /** Adds several ids; returns their combined delta. */
  pushAll(ids: Iterable<number>): string {
    let delta = '';
    for (const id of ids) delta += this.push(id);
    return delta;
  }

  /** Emits whatever is held back (at the end of generation an incomplete character stays U+FFFD). */
  flush(): string {
    const prefixText = this.decodeRange(this.prefixOffset, this.readOffset);
    const windowText = this.decodeRange(this.prefixOffset, this.ids.length);
    const delta = windowText.slice(prefixText.length);
    this.prefixOffset = this.readOffset = this.ids.length;
    this.emitted += delta;
    return delta;
  }

  /** All text emitted so far. */
  get text(): string {
    return this.emitted;
  }

  get tokenIds(): readonly number[] {
    return this.ids;
  }

  private decodeRange(start: number, end: number): string {
    return start >= end ? '' : this.tokenizer.decode(this.ids.slice(start, end), this.options);
  }
}
