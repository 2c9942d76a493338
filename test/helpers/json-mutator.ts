// Mutations of JSON documents for the fuzz suites (configs, tokenizer files, rows): a field set to a
// value of any type or magnitude, removed, or added; the document replaced by another type; and
// sometimes damage to the text itself (truncation, bytes that are not UTF-8, literals JSON has no
// value for, a repeated key, deep nesting).

import type { Random } from './random.js';

/** Values that break assumptions: types, signs, magnitudes, float edge cases, odd strings and shapes. */
export function interestingValue(random: Random): unknown {
  return random.pick<() => unknown>([
    () => null, () => true, () => false,
    () => random.pick([0, -1, 1, 2, 3, 7, 8, 16, 64, 0.5, -0.5, 1e-30, 1e308, -1e308, 2 ** 31, 2 ** 32, 2 ** 53, 2 ** 53 + 2, 4096, 128000, 128009, 128256, 131072, 0.05, 1.5]),
    () => random.int(-1000, 100000),
    () => random.next() * 10 - 5,
    () => random.pick(['', 'x', 'LORA', 'CAUSAL_LM', 'llama3', 'all-linear', 'q_proj', 'lm_head', 'bfloat16', '<|eot_id|>', '<|begin_of_text|>', '\u0000', 'é😀', ' ']),
    () => 'a'.repeat(random.pick([1000, 100_000])),
    () => [],
    () => [random.pick([1, 'q_proj', null, 128009, -1])],
    () => ['q_proj', 'v_proj', random.pick(['lm_head', 'k_proj', '', 'embed_tokens', 'gate_proj'])],
    () => ({}),
    () => ({ rope_type: random.pick(['llama3', 'linear', 'dynamic', 5]), factor: random.pick([8, 0, -1, 1e9, 'x']), low_freq_factor: random.pick([1, 4, 0]), high_freq_factor: random.pick([4, 1, 0]), original_max_position_embeddings: random.pick([8192, 0, -5]) }),
    () => nested(random.int(2, 60)),
  ])();
}

function nested(depth: number): unknown {
  let value: unknown = 1;
  for (let i = 0; i < depth; i++) value = [value];
  return value;
}

export interface MutatedJson {
  /** The file's bytes (not always UTF-8, not always JSON). */
  bytes: Buffer;
  /** What was done, for failure reports. */
  what: string;
}

/**
 * Mutates `base` (not modified): 1-3 edits among `fields` (the document's meaningful keys, dotted for
 * one level of nesting, e.g. "rope_scaling.factor"), unknown keys and the whole document; then, one time
 * in eight, damage to the text.
 */
export function mutateJson(random: Random, base: Record<string, unknown>, fields: readonly string[]): MutatedJson {
  let doc: unknown = structuredClone(base);
  const what: string[] = [];
  const edits = random.int(1, 3);
  for (let i = 0; i < edits; i++) {
    const kind = random.below(10);
    if (kind === 0) {
      doc = random.pick([[], 'config', 1, null, [structuredClone(base)]]);
      what.push('document replaced');
      break;
    }
    if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) break;
    const object = doc as Record<string, unknown>;
    const field = kind === 1 ? random.pick(['extra', '__proto__', 'constructor', '', 'a'.repeat(300)]) : random.pick(fields);
    const [head, tail] = field.split('.', 2) as [string, string | undefined];
    const holder = tail === undefined ? object : (object[head] !== null && typeof object[head] === 'object' && !Array.isArray(object[head]) ? (object[head] as Record<string, unknown>) : null);
    const key = tail ?? head;
    if (holder === null) {
      object[head] = interestingValue(random);
      what.push(`${head} = ${preview(object[head])}`);
    } else if (random.chance(0.2)) {
      delete holder[key];
      what.push(`${field} removed`);
    } else {
      // defineProperty: a "__proto__" key is then an own property, as JSON.parse would make it.
      Object.defineProperty(holder, key, { value: interestingValue(random), enumerable: true, writable: true, configurable: true });
      what.push(`${field} = ${preview(holder[key])}`);
    }
  }
  let text = JSON.stringify(doc);
  let bytes = Buffer.from(text, 'utf8');
  if (random.chance(0.125)) {
    const damage = random.below(7);
    const at = random.below(text.length + 1);
    if (damage === 0) bytes = bytes.subarray(0, random.below(bytes.length + 1));
    if (damage === 1) bytes = Buffer.concat([bytes.subarray(0, at), random.bytes(random.int(1, 4)), bytes.subarray(at)]);
    if (damage === 2) text = text.replace(/:(\d+)/, ':1e400'), bytes = Buffer.from(text);
    if (damage === 3) text = text.replace(/^\{/, '{"r":1,"r":2,'), bytes = Buffer.from(text);
    if (damage === 4) bytes = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), bytes]);
    if (damage === 5) text = text.replace(/^\{/, `{"deep":${'['.repeat(20000)}${']'.repeat(20000)},`), bytes = Buffer.from(text);
    if (damage === 6) text = text.replace(/:(\d+)/, ':NaN'), bytes = Buffer.from(text);
    what.push(`text damage ${damage}`);
  }
  return { bytes, what: what.join('; ') || 'unchanged' };
}

export function preview(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 40 ? `${text.slice(0, 40)}…(${text.length})` : text;
}
