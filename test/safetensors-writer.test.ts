// The TypeScript safetensors writer and header reader: dtype rounding, streaming round trips,
// atomicity, and the reference reader's rejections.

import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  bfloat16ToFloat32,
  float16ToFloat32,
  float32ToBfloat16,
  float32ToFloat16,
  readSafetensorsHeader,
  readTensorAsFloat32,
  SafetensorsWriter,
  writeSafetensors,
} from '../src/engine/safetensors.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'tuneserve-safetensors-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const bits = (value: number) => new Uint32Array(new Float32Array([value]).buffer)[0]!;
const fromBits = (value: number) => new Float32Array(new Uint32Array([value]).buffer)[0]!;

describe('dtype conversion', () => {
  it('rounds float32 to bfloat16 to nearest, ties to even', () => {
    // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: the tie goes to the even 1.0;
    // 1 + 3·2^-8 is halfway between 1.0078125 (odd) and 1.015625 (even): it goes up.
    const input = new Float32Array([1, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -2.5, Infinity, -0]);
    const output = bfloat16ToFloat32(float32ToBfloat16(input));
    expect([...output]).toEqual([1, 1, 1.015625, 1.0078125, -2.5, Infinity, -0]);
    // A large value keeps its top 16 bits, rounded: within half a unit in the last place, ≤ 2^-8 relative.
    const large = bfloat16ToFloat32(float32ToBfloat16(new Float32Array([3.0e38])))[0]!;
    expect(Math.abs(large - 3.0e38) / 3.0e38).toBeLessThanOrEqual(2 ** -8);
    expect(bits(large) & 0xffff).toBe(0);
    expect(Number.isNaN(bfloat16ToFloat32(float32ToBfloat16(new Float32Array([NaN])))[0])).toBe(true);
    // The largest finite float32 rounds up to Inf in bf16 (its dropped half is above halfway).
    expect(bfloat16ToFloat32(float32ToBfloat16(new Float32Array([fromBits(0x7f7fffff)])))[0]).toBe(Infinity);
  });

  it('converts float32 to float16 with rounding, subnormals, overflow and NaN', () => {
    const cases: Array<[number, number]> = [
      [1, 0x3c00],
      [-2, 0xc000],
      [65504, 0x7bff], // largest half
      [65519.99, 0x7bff], // below the halfway point to 65536 stays finite
      [65520, 0x7c00], // halfway rounds to even = Inf
      [1e6, 0x7c00],
      [2 ** -14, 0x0400], // smallest normal
      [2 ** -24, 0x0001], // smallest subnormal
      [2 ** -25, 0x0000], // exactly half the smallest subnormal: tie to even zero
      [1.5 * 2 ** -25, 0x0001],
      [3 * 2 ** -25, 0x0002], // 1.5 subnormal units: tie to even 2
      [1 + 2 ** -11, 0x3c00], // tie between 1 and 1+2^-10: even is 1
      [1 + 3 * 2 ** -11, 0x3c02],
      [-0, 0x8000],
      [Infinity, 0x7c00],
    ];
    const halves = float32ToFloat16(new Float32Array(cases.map(([value]) => value)));
    expect([...halves].map((h) => h.toString(16))).toEqual(cases.map(([, expected]) => expected.toString(16)));
    const nan = float32ToFloat16(new Float32Array([NaN]))[0]!;
    expect(nan & 0x7c00).toBe(0x7c00);
    expect(nan & 0x3ff).not.toBe(0);
  });

  it('float16 → float32 is exact for every half value (round trip through float32ToFloat16)', () => {
    const all = new Uint16Array(65536).map((_, i) => i);
    const widened = float16ToFloat32(all);
    const back = float32ToFloat16(widened);
    const wrong: number[] = [];
    for (let i = 0; i < 65536; i++) {
      const isNaN = (i & 0x7c00) === 0x7c00 && (i & 0x3ff) !== 0;
      if (isNaN ? !Number.isNaN(widened[i]) : back[i] !== i) wrong.push(i);
    }
    expect(wrong).toEqual([]);
    expect(widened[0x0001]).toBe(2 ** -24);
    expect(widened[0x8400]).toBe(-(2 ** -14));
  });
});

describe('writer and reader', () => {
  it('round-trips F32, BF16 and F16 tensors written in chunks, header padded to 8 bytes', async () => {
    const path = join(dir, 'mixed.safetensors');
    const values = Float32Array.from({ length: 30 }, (_, i) => (i - 15) / 7);
    const writer = await SafetensorsWriter.create(
      path,
      [
        { name: 'a.f32', dtype: 'F32', shape: [5, 6] },
        { name: 'b.bf16', dtype: 'BF16', shape: [30] },
        { name: 'c.f16', dtype: 'F16', shape: [2, 3, 5] },
        { name: 'empty', dtype: 'F32', shape: [0, 4] },
      ],
      { metadata: { format: 'pt' } },
    );
    await writer.writeTensor('a.f32', [values.subarray(0, 7), values.subarray(7)]);
    await writer.writeTensor('b.bf16', values);
    async function* chunks() {
      for (let i = 0; i < 30; i += 4) yield values.slice(i, Math.min(30, i + 4));
    }
    await writer.writeTensor('c.f16', chunks());
    await writer.writeTensor('empty', new Float32Array(0));
    await writer.commit();

    const raw = await readFile(path);
    const headerLength = Number(raw.readBigUInt64LE(0));
    expect(headerLength % 8).toBe(0);
    const header = await readSafetensorsHeader(path);
    expect(header.metadata).toEqual({ format: 'pt' });
    expect([...header.tensors.keys()]).toEqual(['a.f32', 'b.bf16', 'c.f16', 'empty']);
    expect(header.tensors.get('b.bf16')).toEqual({ dtype: 'BF16', shape: [30], dataOffsets: [120, 180] });
    expect(header.fileSize).toBe(raw.length);

    expect(await readTensorAsFloat32(path, 'a.f32')).toEqual(values);
    expect(await readTensorAsFloat32(path, 'b.bf16')).toEqual(bfloat16ToFloat32(float32ToBfloat16(values)));
    expect(await readTensorAsFloat32(path, 'c.f16')).toEqual(float16ToFloat32(float32ToFloat16(values)));
    // Leaves no temp file behind.
    expect((await readdir(dir)).filter((name) => name.includes('.tmp-'))).toEqual([]);
  });

  it('refuses out-of-order tensors and wrong element counts, and abort leaves nothing', async () => {
    const path = join(dir, 'bad.safetensors');
    const specs = [
      { name: 'x', dtype: 'F32' as const, shape: [2] },
      { name: 'y', dtype: 'F32' as const, shape: [3] },
    ];
    const outOfOrder = await SafetensorsWriter.create(path, specs);
    await expect(outOfOrder.writeTensor('y', new Float32Array(3))).rejects.toThrow(/out of order: expected "x"/);
    await outOfOrder.abort();

    const wrongCount = await SafetensorsWriter.create(path, specs);
    await expect(wrongCount.writeTensor('x', new Float32Array(3))).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });

    const incomplete = await SafetensorsWriter.create(path, specs);
    await incomplete.writeTensor('x', new Float32Array(2));
    await expect(incomplete.commit()).rejects.toThrow(/"y" and later ones were never written/);

    expect((await readdir(dir)).filter((name) => name.startsWith('.bad') || name === 'bad.safetensors')).toEqual([]);
  });

  it('keeps an existing file intact until the new one is committed', async () => {
    const path = join(dir, 'replace.safetensors');
    await writeSafetensors(path, [{ name: 'w', dtype: 'F32', shape: [2], values: new Float32Array([1, 2]) }]);
    const writer = await SafetensorsWriter.create(path, [{ name: 'w', dtype: 'F32', shape: [2] }]);
    expect(await readTensorAsFloat32(path, 'w')).toEqual(new Float32Array([1, 2]));
    await writer.writeTensor('w', new Float32Array([3, 4]));
    await writer.commit();
    expect(await readTensorAsFloat32(path, 'w')).toEqual(new Float32Array([3, 4]));
  });

  it('refuses duplicate names and bad shapes when creating', async () => {
    const path = join(dir, 'never.safetensors');
    await expect(SafetensorsWriter.create(path, [{ name: 'a', dtype: 'F32', shape: [1] }, { name: 'a', dtype: 'F32', shape: [1] }])).rejects.toThrow(/duplicate/);
    await expect(SafetensorsWriter.create(path, [{ name: 'a', dtype: 'F32', shape: [1.5] }])).rejects.toThrow(/bad shape/);
  });
});

describe('header reader rejects malformed files (REFERENCE.md checks)', () => {
  const header = (json: string, dataBytes = 0, declaredLength?: bigint) => {
    const body = Buffer.from(json, 'utf8');
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(declaredLength ?? BigInt(body.length));
    return Buffer.concat([length, body, Buffer.alloc(dataBytes)]);
  };
  const cases: Array<[string, Buffer, RegExp]> = [
    ['under 8 bytes', Buffer.alloc(5), /shorter than the 8-byte/],
    ['huge header length', header('{}', 0, 200_000_000n), /exceeds 100000000/],
    ['header past the end', header('{}', 0, 64n), /runs past the end/],
    ['not UTF-8', Buffer.concat([header('{"a":1}').subarray(0, 8), Buffer.from([0x7b, 0xff, 0xfe, 0x7d, 0x20, 0x20, 0x20])]), /not valid UTF-8/],
    ['not JSON', header('{"a": '), /not JSON/],
    ['not an object', header('[1,2]'), /not a JSON object/],
    ['duplicate names', header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8), /duplicate tensor name "a"/],
    ['unknown dtype', header('{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}', 4), /unknown dtype/],
    ['end before begin', header('{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}', 4), /ends \(0\) before it begins/],
    ['size mismatch', header('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4), /= 8 bytes but its offsets span 4/],
    ['gap in offsets', header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8), /starts at 4, expected 0/],
    ['trailing bytes', header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 12), /data section is 12 bytes but the tensors cover 4/],
    ['truncated data', header('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', 8), /data section is 8 bytes but the tensors cover 16/],
    ['overflowing shape', header('{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}', 4), /overflows/],
    ['negative dim', header('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', 4), /bad shape/],
    // Found by the reliability fuzzer (test/reliability/safetensors-fuzz.test.ts): JSON.parse accepted
    // these, the native reader and the reference refuse them.
    ['repeated __metadata__ key', header('{"__metadata__":{"a":"b","a":"c"}}'), /duplicate key "a" in "__metadata__"/],
    ['repeated field in an entry', header('{"a":{"dtype":"F32","shape":[1],"dtype":"U8","data_offsets":[0,4]}}', 4), /duplicate key "dtype" in "a"/],
    ['lone surrogate escape', header('{"\\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'), /lone UTF-16 surrogate/],
    ['a dimension written 1.0', header('{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', 4), /has a bad shape: 1.0 is not a plain non-negative integer/],
    ['an offset written -0', header('{"a":{"dtype":"U8","shape":[0],"data_offsets":[-0,0]}}'), /has bad data_offsets: -0 is not a plain/],
  ];
  for (const [label, bytes, message] of cases) {
    it(label, async () => {
      const path = join(dir, `reject-${label.replace(/\W+/g, '-')}.safetensors`);
      await writeFile(path, bytes);
      const error = await readSafetensorsHeader(path).catch((e: unknown) => e);
      expect(error).toMatchObject({ code: 'INVALID_SAFETENSORS' });
      expect((error as Error).message).toMatch(message);
      expect((error as Error).message).toContain(path);
    });
  }

  it('names a missing file NOT_FOUND', async () => {
    await expect(readSafetensorsHeader(join(dir, 'absent.safetensors'))).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });
});
