// safetensors in TypeScript: a streaming, atomic writer (F32, BF16, F16) and a validating header
// reader. Format: u64 little-endian header length N, N bytes of JSON, then the tensors' bytes.
//
// The writer knows every tensor's name, dtype and shape up front, writes the header first and then
// each tensor's bytes as the caller produces them (in chunks, so a 16 GB model never sits in memory),
// into a temp file that is fsynced and renamed over the target only when complete (atomic-file.ts).

import { open, type FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import { AtomicFile } from './atomic-file.js';
import { EngineError } from './errors.js';

/** dtypes this writer produces. */
export type WritableDtype = 'F32' | 'BF16' | 'F16';

/** Bytes per element of every dtype the safetensors format defines (the reader accepts all of them). */
export const DTYPE_BYTES: Readonly<Record<string, number>> = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1,
  U16: 2, I16: 2, F16: 2, BF16: 2,
  U32: 4, I32: 4, F32: 4,
  U64: 8, I64: 8, F64: 8,
};

/** The reference reader refuses larger headers (REFERENCE.md). */
export const MAX_HEADER_BYTES = 100_000_000;

export interface TensorSpec {
  name: string;
  dtype: WritableDtype;
  shape: readonly number[];
}

export interface TensorEntry {
  dtype: string;
  shape: number[];
  /** [begin, end) in bytes, relative to the start of the data section. */
  dataOffsets: [number, number];
}

export interface SafetensorsHeader {
  path: string;
  /** Absolute byte offset of the data section (8 + header length). */
  dataStart: number;
  fileSize: number;
  /** In file order (ascending offsets). */
  tensors: Map<string, TensorEntry>;
  metadata: Record<string, string> | null;
}

/** Chunks of float32 values for one tensor, in row-major order; any chunk sizes. */
export type Float32Chunks = Iterable<Float32Array> | AsyncIterable<Float32Array>;

if (endianness() !== 'LE') {
  // Typed arrays use the host byte order and safetensors is little-endian; every target of this
  // project (x86-64, arm64) is little-endian, so a big-endian host is refused rather than handled.
  throw new Error('safetensors.ts assumes a little-endian host');
}

export function elementCount(shape: readonly number[]): number {
  let count = 1;
  for (const dim of shape) count *= dim;
  return count;
}

// ---------------------------------------------------------------------------------------------
// dtype conversion

/** float32 → bfloat16 bits, round to nearest even; NaN stays NaN (quiet, sign kept). */
export function float32ToBfloat16(source: Float32Array, target = new Uint16Array(source.length)): Uint16Array {
  const bits = new Uint32Array(source.buffer, source.byteOffset, source.length);
  for (let i = 0; i < bits.length; i++) {
    const x = bits[i]!;
    if ((x & 0x7fffffff) > 0x7f800000) {
      target[i] = ((x >>> 16) & 0x8000) | 0x7fc0;
    } else {
      // Adding 0x7fff plus the lowest kept bit rounds halfway cases to the even neighbour.
      target[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
    }
  }
  return target;
}

/** float32 → IEEE half bits, round to nearest even, with subnormals, ±Inf on overflow, NaN kept. */
export function float32ToFloat16(source: Float32Array, target = new Uint16Array(source.length)): Uint16Array {
  const bits = new Uint32Array(source.buffer, source.byteOffset, source.length);
  for (let i = 0; i < bits.length; i++) target[i] = float32BitsToFloat16Bits(bits[i]!);
  return target;
}

/** One float32 (as its bits) → half bits; float32ToFloat16 applies it to arrays. */
export function float32BitsToFloat16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exponent = (x >>> 23) & 0xff;
  let mantissa = x & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa !== 0 ? 0x200 | (mantissa >>> 13) : 0);
  const halfExponent = exponent - 127 + 15;
  if (halfExponent >= 0x1f) return sign | 0x7c00;
  if (halfExponent <= 0) {
    // Below 2^-25 everything rounds to zero (2^-25 itself is a tie that goes to the even zero).
    if (halfExponent < -10) return sign;
    mantissa |= 0x800000;
    const shift = 14 - halfExponent;
    const halfway = 1 << (shift - 1);
    const remainder = mantissa & ((1 << shift) - 1);
    let rounded = mantissa >>> shift;
    if (remainder > halfway || (remainder === halfway && (rounded & 1) === 1)) rounded++;
    return sign | rounded; // a carry into 0x400 is the smallest normal, encoded correctly
  }
  let rounded = (halfExponent << 10) | (mantissa >>> 13);
  const remainder = mantissa & 0x1fff;
  if (remainder > 0x1000 || (remainder === 0x1000 && (rounded & 1) === 1)) rounded++; // carry may reach Inf: correct
  return sign | rounded;
}

export function bfloat16ToFloat32(source: Uint16Array, target = new Float32Array(source.length)): Float32Array {
  const bits = new Uint32Array(target.buffer, target.byteOffset, target.length);
  for (let i = 0; i < source.length; i++) bits[i] = source[i]! << 16;
  return target;
}

export function float16ToFloat32(source: Uint16Array, target = new Float32Array(source.length)): Float32Array {
  const bits = new Uint32Array(target.buffer, target.byteOffset, target.length);
  for (let i = 0; i < source.length; i++) {
    const h = source[i]!;
    const sign = (h & 0x8000) << 16;
    const exponent = (h >>> 10) & 0x1f;
    const mantissa = h & 0x3ff;
    if (exponent === 0x1f) {
      bits[i] = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent !== 0) {
      bits[i] = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
    } else if (mantissa === 0) {
      bits[i] = sign;
    } else {
      target[i] = (sign !== 0 ? -1 : 1) * mantissa * 2 ** -24; // subnormal: exact in float32
    }
  }
  return target;
}

/** Encodes float32 values as `dtype` bytes (a view; copy it if the source changes). */
export function encodeFloat32As(dtype: WritableDtype, values: Float32Array): Uint8Array {
  if (dtype === 'F32') return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const halves = dtype === 'BF16' ? float32ToBfloat16(values) : float32ToFloat16(values);
  return new Uint8Array(halves.buffer, halves.byteOffset, halves.byteLength);
}

// ---------------------------------------------------------------------------------------------
// writer

function buildHeader(specs: readonly TensorSpec[], metadata: Record<string, string> | undefined): { bytes: Buffer; dataBytes: number; sizes: number[] } {
  const header: Record<string, unknown> = {};
  if (metadata !== undefined) {
    for (const [key, value] of Object.entries(metadata)) {
      if (typeof value !== 'string') throw new EngineError('INVALID_ARGUMENT', `safetensors metadata value for "${key}" must be a string`);
    }
    header.__metadata__ = metadata;
  }
  let offset = 0;
  const sizes: number[] = [];
  for (const spec of specs) {
    if (typeof spec.name !== 'string' || spec.name.length === 0 || spec.name === '__metadata__') {
      throw new EngineError('INVALID_ARGUMENT', `bad tensor name ${JSON.stringify(spec.name)}`);
    }
    if (Object.prototype.hasOwnProperty.call(header, spec.name)) throw new EngineError('INVALID_ARGUMENT', `duplicate tensor name "${spec.name}"`);
    if (!(spec.dtype in { F32: 1, BF16: 1, F16: 1 })) throw new EngineError('INVALID_ARGUMENT', `tensor "${spec.name}": unsupported dtype ${spec.dtype}`);
    if (!spec.shape.every((dim) => Number.isSafeInteger(dim) && dim >= 0)) {
      throw new EngineError('INVALID_ARGUMENT', `tensor "${spec.name}": bad shape [${spec.shape.join(', ')}]`);
    }
    const size = elementCount(spec.shape) * DTYPE_BYTES[spec.dtype]!;
    if (!Number.isSafeInteger(offset + size)) throw new EngineError('INVALID_ARGUMENT', `tensor "${spec.name}" is too large`);
    header[spec.name] = { dtype: spec.dtype, shape: [...spec.shape], data_offsets: [offset, offset + size] };
    sizes.push(size);
    offset += size;
  }
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writers do.
  const paddedLength = Math.ceil(json.length / 8) * 8;
  const bytes = Buffer.alloc(8 + paddedLength, 0x20);
  bytes.writeBigUInt64LE(BigInt(paddedLength), 0);
  json.copy(bytes, 8);
  return { bytes, dataBytes: offset, sizes };
}

/**
 * Streams one safetensors file. Tensors are written in the order of `specs` (which is also their
 * order in the file); `commit()` makes the file appear at `path` atomically, `abort()` removes it.
 * The temp file, fsync and rename are atomic-file.ts's AtomicFile.
 */
export class SafetensorsWriter {
  readonly path: string;
  readonly specs: readonly TensorSpec[];
  /** Bytes of the whole file once complete. */
  readonly fileSize: number;
  private readonly file: AtomicFile;
  private readonly sizes: number[];
  private nextTensor = 0;
  private closed = false;

  private constructor(path: string, file: AtomicFile, specs: readonly TensorSpec[], sizes: number[], fileSize: number) {
    this.path = path;
    this.file = file;
    this.specs = specs;
    this.sizes = sizes;
    this.fileSize = fileSize;
  }

  static async create(path: string, specs: readonly TensorSpec[], options: { metadata?: Record<string, string> } = {}): Promise<SafetensorsWriter> {
    const { bytes, dataBytes, sizes } = buildHeader(specs, options.metadata);
    const writer = new SafetensorsWriter(path, await AtomicFile.create(path), specs, sizes, bytes.length + dataBytes);
    await writer.writeBytes(bytes);
    return writer;
  }

  /** Writes the next tensor, which must be `name`, from one array or from chunks in row-major order. */
  async writeTensor(name: string, values: Float32Array | Float32Chunks): Promise<void> {
    const spec = this.expectTensor(name);
    const expectedElements = elementCount(spec.shape);
    let written = 0;
    const chunks: Float32Chunks = values instanceof Float32Array ? [values] : values;
    for await (const chunk of chunks) {
      written += chunk.length;
      if (written > expectedElements) break;
      if (chunk.length > 0) await this.writeBytes(encodeFloat32As(spec.dtype, chunk));
    }
    if (written !== expectedElements) {
      await this.abort();
      throw new EngineError('INVALID_ARGUMENT', `tensor "${name}": got ${written} values, shape [${spec.shape.join(', ')}] needs ${expectedElements}`);
    }
    this.nextTensor++;
  }

  /** Writes the next tensor from bytes already in its dtype (little-endian), whole or in chunks. */
  async writeTensorBytes(name: string, bytes: Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>): Promise<void> {
    this.expectTensor(name);
    const expectedBytes = this.sizes[this.nextTensor]!;
    let written = 0;
    const chunks = bytes instanceof Uint8Array ? [bytes] : bytes;
    for await (const chunk of chunks) {
      written += chunk.byteLength;
      if (written > expectedBytes) break;
      if (chunk.byteLength > 0) await this.writeBytes(chunk);
    }
    if (written !== expectedBytes) {
      await this.abort();
      throw new EngineError('INVALID_ARGUMENT', `tensor "${name}": got ${written} bytes, expected ${expectedBytes}`);
    }
    this.nextTensor++;
  }

  /** Flushes to disk and renames the temp file onto `path`; the directory entry is synced too. */
  async commit(): Promise<void> {
    this.checkOpen();
    if (this.nextTensor !== this.specs.length) {
      const missing = this.specs[this.nextTensor]!.name;
      await this.abort();
      throw new EngineError('INVALID_ARGUMENT', `safetensors ${this.path}: tensor "${missing}" and later ones were never written`);
    }
    this.closed = true;
    await this.file.commit();
  }

  /** Drops the partial file; safe to call more than once and after a failure. */
  async abort(): Promise<void> {
    this.closed = true;
    await this.file.abort();
  }

  private expectTensor(name: string): TensorSpec {
    this.checkOpen();
    const spec = this.specs[this.nextTensor];
    if (spec === undefined) throw new EngineError('INVALID_ARGUMENT', `tensor "${name}": all ${this.specs.length} tensors are already written`);
    if (spec.name !== name) throw new EngineError('INVALID_ARGUMENT', `tensor "${name}" written out of order: expected "${spec.name}"`);
    return spec;
  }

  private checkOpen(): void {
    if (this.closed) throw new EngineError('INVALID_ARGUMENT', `safetensors writer for ${this.path} is already closed`);
  }

  private async writeBytes(bytes: Uint8Array): Promise<void> {
    this.checkOpen();
    try {
      await this.file.write(bytes);
    } catch (error) {
      this.closed = true;
      throw error;
    }
  }
}

/** Kept for engine.ts, which imports it from here; everything else imports atomic-file.ts. */

/** A whole small safetensors file as bytes in memory (to hash before writing it with atomic-file.ts). */
export function encodeSafetensors(tensors: ReadonlyArray<TensorSpec & { values: Float32Array }>, metadata?: Record<string, string>): Uint8Array {
  const { bytes, dataBytes } = buildHeader(tensors, metadata);
  const out = new Uint8Array(bytes.length + dataBytes);
  out.set(bytes, 0);
  let offset = bytes.length;
  for (const tensor of tensors) {
    const expected = elementCount(tensor.shape);
    if (tensor.values.length !== expected) {
      throw new EngineError('INVALID_ARGUMENT', `tensor "${tensor.name}": got ${tensor.values.length} values, shape [${tensor.shape.join(', ')}] needs ${expected}`);
    }
    const encoded = encodeFloat32As(tensor.dtype, tensor.values);
    out.set(encoded, offset);
    offset += encoded.byteLength;
  }
  return out;
}

/** Writes a whole small file in one call (tests, adapters): every tensor given as float32 values. */
export async function writeSafetensors(
  path: string,
  tensors: ReadonlyArray<TensorSpec & { values: Float32Array }>,
  metadata?: Record<string, string>,
): Promise<void> {
  const writer = await SafetensorsWriter.create(path, tensors, metadata === undefined ? {} : { metadata });
  for (const tensor of tensors) await writer.writeTensor(tensor.name, tensor.values);
  await writer.commit();
}

// ---------------------------------------------------------------------------------------------
// reader

function invalid(path: string, problem: string): EngineError {
  return new EngineError('INVALID_SAFETENSORS', `${path}: ${problem}`, { path });
}

/** Reads and validates a header with the reference reader's checks (REFERENCE.md). */
export async function readSafetensorsHeader(path: string): Promise<SafetensorsHeader> {
  let handle: FileHandle;
  try {
    handle = await open(path, 'r');
  } catch (error) {
    const code = (error as { code?: string }).code === 'ENOENT' ? 'NOT_FOUND' : 'IO_ERROR';
    throw new EngineError(code, `cannot open ${path}: ${(error as Error).message}`, { path }, { cause: error });
  }
  try {
    const fileSize = (await handle.stat()).size;
    if (fileSize < 8) throw invalid(path, `file is ${fileSize} bytes, shorter than the 8-byte header length`);
    const lengthBytes = Buffer.alloc(8);
    await readExactly(handle, lengthBytes, 0);
    const headerLength = lengthBytes.readBigUInt64LE(0);
    if (headerLength > BigInt(MAX_HEADER_BYTES)) throw invalid(path, `header length ${headerLength} exceeds ${MAX_HEADER_BYTES}`);
    const headerBytes = Number(headerLength);
    if (8 + headerBytes > fileSize) throw invalid(path, `header of ${headerBytes} bytes runs past the end of the ${fileSize}-byte file`);
    const jsonBytes = Buffer.alloc(headerBytes);
    await readExactly(handle, jsonBytes, 8);
    return parseHeader(path, jsonBytes, fileSize);
  } finally {
    await handle.close();
  }
}

async function readExactly(handle: FileHandle, target: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < target.byteLength) {
    const { bytesRead } = await handle.read(target, done, target.byteLength - done, position + done);
    if (bytesRead === 0) throw new EngineError('IO_ERROR', 'unexpected end of file');
    done += bytesRead;
  }
}

function parseHeader(path: string, jsonBytes: Uint8Array, fileSize: number): SafetensorsHeader {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(jsonBytes);
  } catch {
    throw invalid(path, 'header is not valid UTF-8');
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw invalid(path, `header is not JSON: ${(error as Error).message}`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw invalid(path, 'header is not a JSON object');
  // What JSON.parse lets through and the reference reader (and native/core/safetensors.cpp) refuses.
  const problem = strictHeaderProblem(text);
  if (problem !== null) throw invalid(path, problem);
  const dataStart = 8 + jsonBytes.byteLength;
  let metadata: Record<string, string> | null = null;
  const entries: Array<[string, TensorEntry]> = [];
  for (const [name, raw] of Object.entries(parsed as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw invalid(path, '__metadata__ is not an object');
      for (const [key, value] of Object.entries(raw)) if (typeof value !== 'string') throw invalid(path, `__metadata__.${key} is not a string`);
      metadata = raw as Record<string, string>;
      continue;
    }
    entries.push([name, parseEntry(path, name, raw)]);
  }
  entries.sort((a, b) => a[1].dataOffsets[0] - b[1].dataOffsets[0] || a[1].dataOffsets[1] - b[1].dataOffsets[1]);
  let expectedBegin = 0;
  for (const [name, entry] of entries) {
    const [begin, end] = entry.dataOffsets;
    if (begin !== expectedBegin) throw invalid(path, `tensor "${name}" starts at ${begin}, expected ${expectedBegin} (offsets must be contiguous from 0)`);
    expectedBegin = end;
  }
  if (dataStart + expectedBegin !== fileSize) {
    throw invalid(path, `data section is ${fileSize - dataStart} bytes but the tensors cover ${expectedBegin}`);
  }
  return { path, dataStart, fileSize, tensors: new Map(entries), metadata };
}

/**
 * The reference reader's rules that JSON.parse does not apply, checked on a header already known to be
 * a JSON object: no repeated key at the top level, inside __metadata__ or inside a tensor entry
 * (JSON.parse keeps the last silently); no lone UTF-16 surrogate escaped in a string (it is no Unicode
 * text); shape and data_offsets written as plain non-negative integers (JSON.parse reads 1.0, 1e0 and -0
 * as integers, the reference refuses them). Returns the first problem, or null.
 */
function strictHeaderProblem(text: string): string | null {
  interface Frame { object: boolean; key: string | null; keys: Set<string>; awaitingKey: boolean; lastKey: string | null }
  const stack: Frame[] = [];
  const plainInteger = /^(0|[1-9][0-9]*)$/;
  for (let i = 0; i < text.length; i++) {
    const char = text[i]!;
    const frame = stack.at(-1);
    if (char === '"') {
      let end = i + 1;
      while (text[end] !== '"') end += text[end] === '\\' ? 2 : 1;
      const value = JSON.parse(text.slice(i, end + 1)) as string;
      if (!(value as string & { isWellFormed(): boolean }).isWellFormed()) return `string ${JSON.stringify(value)} holds a lone UTF-16 surrogate`;
      if (frame?.object && frame.awaitingKey) {
        // Depth 1: tensor names; depth 2: __metadata__ keys or a tensor's fields.
        if (stack.length <= 2 && frame.keys.has(value)) {
          return stack.length === 1 ? `duplicate tensor name "${value}"` : `duplicate key "${value}" in ${JSON.stringify(frame.key)}`;
        }
        frame.keys.add(value);
        frame.lastKey = value;
        frame.awaitingKey = false;
      }
      i = end;
    } else if (char === '{' || char === '[') {
      stack.push({ object: char === '{', key: frame?.object ? frame.lastKey : null, keys: new Set(), awaitingKey: char === '{', lastKey: null });
    } else if (char === '}' || char === ']') {
      stack.pop();
    } else if (char === ',' && frame?.object) {
      frame.awaitingKey = true;
    } else if (char === '-' || (char >= '0' && char <= '9')) {
      let end = i;
      while (end < text.length && /[-+.eE0-9]/.test(text[end]!)) end++;
      const literal = text.slice(i, end);
      const entry = stack[1];
      if (stack.length === 3 && !frame!.object && (frame!.key === 'shape' || frame!.key === 'data_offsets') && entry?.key !== '__metadata__' && !plainInteger.test(literal)) {
        return `tensor "${entry?.key}" has ${frame!.key === 'shape' ? 'a bad shape' : 'bad data_offsets'}: ${literal} is not a plain non-negative integer`;
      }
      i = end - 1;
    }
  }
  return null;
}

function parseEntry(path: string, name: string, raw: unknown): TensorEntry {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw invalid(path, `tensor "${name}" is not an object`);
  const { dtype, shape, data_offsets: offsets } = raw as Record<string, unknown>;
  if (typeof dtype !== 'string' || DTYPE_BYTES[dtype] === undefined) throw invalid(path, `tensor "${name}" has unknown dtype ${JSON.stringify(dtype)}`);
  if (!Array.isArray(shape) || !shape.every((dim) => Number.isSafeInteger(dim) && dim >= 0)) {
    throw invalid(path, `tensor "${name}" has a bad shape ${JSON.stringify(shape)}`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((offset) => Number.isSafeInteger(offset) && offset >= 0)) {
    throw invalid(path, `tensor "${name}" has bad data_offsets ${JSON.stringify(offsets)}`);
  }
  const [begin, end] = offsets as [number, number];
  if (end < begin) throw invalid(path, `tensor "${name}" ends (${end}) before it begins (${begin})`);
  const bytes = elementCount(shape as number[]) * DTYPE_BYTES[dtype]!;
  if (!Number.isSafeInteger(bytes)) throw invalid(path, `tensor "${name}" shape overflows`);
  if (bytes !== end - begin) throw invalid(path, `tensor "${name}" is ${dtype} [${shape.join(', ')}] = ${bytes} bytes but its offsets span ${end - begin}`);
  return { dtype, shape: shape as number[], dataOffsets: [begin, end] };
}

/** Reads one F32/BF16/F16 tensor as float32 (for checks and small files; it allocates the tensor). */
export async function readTensorAsFloat32(path: string, name: string, header?: SafetensorsHeader): Promise<Float32Array> {
  const resolved = header ?? (await readSafetensorsHeader(path));
  const entry = resolved.tensors.get(name);
  if (entry === undefined) throw new EngineError('NOT_FOUND', `${path}: no tensor "${name}"`, { path, tensor: name });
  const [begin, end] = entry.dataOffsets;
  const bytes = new Uint8Array(end - begin);
  const handle = await open(path, 'r');
  try {
    await readExactly(handle, bytes, resolved.dataStart + begin);
  } finally {
    await handle.close();
  }
  const count = elementCount(entry.shape);
  switch (entry.dtype) {
    case 'F32':
      return new Float32Array(bytes.buffer, 0, count);
    case 'BF16':
      return bfloat16ToFloat32(new Uint16Array(bytes.buffer, 0, count));
    case 'F16':
      return float16ToFloat32(new Uint16Array(bytes.buffer, 0, count));
    default:
      throw new EngineError('UNSUPPORTED', `${path}: tensor "${name}" has dtype ${entry.dtype}; only F32, BF16 and F16 are read`);
  }
}
