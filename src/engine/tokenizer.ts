// The Llama 3 tokenizer: @huggingface/tokenizers on the model's own tokenizer.json and
// tokenizer_config.json, plus what the engine needs on top: exactly-one-BOS encoding, text that can
// never become a control token, the model's chat template with assistant masks (chat-template.ts),
// and a streaming detokenizer that never splits a UTF-8 character.
//
// Train and serve tokenize alike: encodeUserContent is the one function that turns text from a
// client or a dataset into ids. Generate's text prompts, every text field of every training row
// format and every chat message content go through it, so "<|eot_id|>" typed by a user is always
// the characters, never the control token 128009. Only template text and ids given as ids carry
// control tokens.

import { Tokenizer } from '@huggingface/tokenizers';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { CHAT_ROLES, ChatTemplate, LLAMA3_CHAT_TEMPLATE, type ChatEncoding, type ChatMessage } from './chat-template.js';
import { EngineError } from './errors.js';
import { checkTokenizerMatchesConfig, readLlamaConfig } from './model-folder.js';

export type { ChatEncoding, ChatMessage } from './chat-template.js';

export { CHAT_ROLES } from './chat-template.js';

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

const SPECIAL = {
  bos: '<|begin_of_text|>',
  endOfText: '<|end_of_text|>',
  eot: '<|eot_id|>',
  eom: '<|eom_id|>',
  startHeader: '<|start_header_id|>',
  endHeader: '<|end_header_id|>',
} as const;

export class LlamaTokenizer {
  readonly specialIds: SpecialTokenIds;
  /** The chat template of tokenizer_config.json, or null when it has none (then LLAMA3_CHAT_TEMPLATE is used). */
  readonly chatTemplate: string | null;
  /** Number of ids that have a token (base vocabulary plus added tokens). */
  readonly vocabSize: number;
  private readonly tokenizer: Tokenizer;
  private readonly config: Record<string, unknown>;
  /** Added tokens (all control tokens in Llama 3) by their text. */
  private readonly controlTokens: Map<string, number>;
  private readonly controlIds: Set<number>;
  private chat: ChatTemplate | null = null;

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
    this.controlTokens = new Map();
    const added = (tokenizerJson as { added_tokens?: unknown }).added_tokens;
    for (const token of Array.isArray(added) ? added : []) {
      const { content, id } = (token ?? {}) as { content?: unknown; id?: unknown };
      if (typeof content === 'string' && content !== '' && typeof id === 'number') this.controlTokens.set(content, id);
    }
    this.controlIds = new Set(this.controlTokens.values());
    this.probe();
  }

  /**
   * Runs every operation once on probe inputs. Files that construct but break on use (a decoder or
   * post-processor of the wrong shape, an added token too long for the control-token pattern) fail here
   * as INVALID_CONFIG, at load, instead of failing every request with a library TypeError (found by
   * test/reliability/tokenizer-fuzz.test.ts). EngineErrors are what a template may legitimately say
   * about a conversation; they are left to the requests that meet them.
   */
  private probe(): void {
    try {
      const ids = [...this.encode('Hello world! <|eot_id|> é😀 12\n', { addBos: true }), ...this.encodeText('<|eot_id|> x', { addBos: true })];
      this.decode([...ids, ...this.controlIds], { skipSpecialTokens: false });
      this.decode(ids, { skipSpecialTokens: true });
      const detokenizer = this.detokenizer({ skipSpecialTokens: true });
      detokenizer.pushAll(ids);
      detokenizer.flush();
      this.encodeChat([{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello.' }], { addGenerationPrompt: false });
    } catch (error) {
      if (error instanceof EngineError) return;
      throw new EngineError('INVALID_CONFIG', `tokenizer.json / tokenizer_config.json load but fail on a probe text: ${(error as Error)?.message ?? String(error)}`, undefined, { cause: error });
    }
  }

  /**
   * Loads tokenizer.json and tokenizer_config.json from a folder; when the folder is a model folder
   * (it has config.json), a tokenizer that does not match the model is refused (INVALID_CONFIG).
   */
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
    const tokenizer = new LlamaTokenizer(await read('tokenizer.json'), await read('tokenizer_config.json'));
    // In a model folder the tokenizer must belong to the model (a tokenizer-only folder has no config.json).
    const configFile = join(dir, 'config.json');
    if (await fileExists(configFile)) checkTokenizerMatchesConfig(tokenizer, await readLlamaConfig(dir), configFile);
    return tokenizer;
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
   * Encodes text from a client or a dataset: plain text (encodeUserContent), after exactly one
   * <|begin_of_text|> when addBos. The one entry point for text prompts and training row text.
   */
  encodeText(text: string, options: { addBos: boolean }): number[] {
    const ids = this.encodeUserContent(text);
    return options.addBos ? [this.specialIds.bos, ...ids] : ids;
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

  /** Whether the id is an added (control) token, such as <|eot_id|> or a reserved special token. */
  isControlToken(id: number): boolean {
    return this.controlIds.has(id);
  }

  tokenToId(token: string): number | undefined {
    return this.tokenizer.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /** Renders the chat template (tokenizer_config.json's, or LLAMA3_CHAT_TEMPLATE) to text. */
  applyChatTemplate(messages: readonly ChatMessage[], options: { addGenerationPrompt: boolean }): string {
    validateMessages(messages);
    return this.chatTemplateEncoder().render(messages, options.addGenerationPrompt);
  }

  /**
   * Encodes a conversation with the model's chat template (chat-template.ts): contents are plain
   * text, the template's control tokens are control tokens, and assistantMask marks each assistant
   * turn (content and end-of-turn token). Generate's chat prompt is this with addGenerationPrompt;
   * training's chat rows are this without, and the first is a prefix of the second.
   */
  encodeChat(messages: readonly ChatMessage[], options: { addGenerationPrompt: boolean }): ChatEncoding {
    validateMessages(messages);
    return this.chatTemplateEncoder().encode(messages, options);
  }

  private chatTemplateEncoder(): ChatTemplate {
    // tokenizer_config.json gives a token as a string or as an AddedToken object {content, ...}.
    const token = (field: string, fallback: string): string => {
      const value = this.config[field];
      if (typeof value === 'string') return value;
      const content = (value as { content?: unknown } | null | undefined)?.content;
      return typeof content === 'string' ? content : fallback;
    };
    this.chat ??= new ChatTemplate(
      this.chatTemplate ?? LLAMA3_CHAT_TEMPLATE,
      { bos_token: token('bos_token', SPECIAL.bos), eos_token: token('eos_token', SPECIAL.endOfText) },
      { encodeLiteral: (text) => this.encodeUserContent(text), controlTokens: this.controlTokens, bos: this.specialIds.bos },
    );
    return this.chat;
  }

  /** A streaming detokenizer for this tokenizer. */
  detokenizer(options: { skipSpecialTokens?: boolean } = {}): IncrementalDetokenizer {
    return new IncrementalDetokenizer(this, options);
  }
}

async function fileExists(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
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
