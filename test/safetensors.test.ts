// The native safetensors reader and writer (native/core/safetensors.cpp) through the addon: round trips
// in F32/BF16/F16 with the rounding checked against an arithmetic JS reference, the on-disk layout,
// and one test per malformed file the reference implementation rejects (REFERENCE.md).
// (The TypeScript reader/writer in src/engine/safetensors.ts has its own suite: safetensors-writer.test.ts.)
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { native as loadNative } from "../src/engine/native.js";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";

interface HeaderTensor {
  name: string;
  dtype: string;
  shape: number[];
  begin: number;
  end: number;
}
interface NativeCore {
  safetensorsHeader(path: string): { tensors: HeaderTensor[]; metadata: Record<string, string> };
  safetensorsReadF32(path: string, name: string): Float32Array;
  safetensorsWrite(
    path: string,
    tensors: { name: string; dtype: "F32" | "BF16" | "F16"; shape: number[]; data: Float32Array }[],
    metadata?: Record<string, string>,
  ): void;
}

const native = loadNative() as unknown as NativeCore;

const dir = mkdtempSync(join(tmpdir(), "tuneserve-safetensors-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let fileCounter = 0;
const freshPath = (label: string): string => join(dir, `${label}-${fileCounter++}.safetensors`);

// ---------------------------------------------------------------------------------------------------
// Arithmetic rounding reference, deliberately unlike the C++ bit tricks: scale |x| so the format's
// last mantissa bit is 1, round half to even, scale back. `p` significant bits, `emin` the smallest
// normal exponent (subnormals share its step), `maxFinite` the largest finite value.
function roundToFormat(x: number, p: number, emin: number, maxFinite: number): number {
  if (Number.isNaN(x)) return NaN;
  if (x === 0 || !Number.isFinite(x)) return x; // keeps -0 and ±inf
  const a = Math.abs(x);
  let e = Math.floor(Math.log2(a));
  while (2 ** e > a) e--; // log2 can be off by one near powers of two
  while (2 ** (e + 1) <= a) e++;
  const step = 2 ** (Math.max(e, emin) - (p - 1));
  const q = a / step; // exact: power-of-two scaling of a float32 value
  const floor = Math.floor(q);
  const rest = q - floor;
  const rounded = rest > 0.5 || (rest === 0.5 && floor % 2 === 1) ? floor + 1 : floor;
  const r = rounded * step;
  // IEEE: a result that rounds (with unbounded exponent) above the largest finite value is inf.
  return Math.sign(x) * (r > maxFinite ? Infinity : r);
}
const bf16Reference = (x: number): number => roundToFormat(x, 8, -126, 3.3895313892515355e38);
const f16Reference = (x: number): number => roundToFormat(x, 11, -14, 65504);

/** Deterministic values: normals at many scales, subnormals, ties and the extremes of each format. */
function testValues(): Float32Array {
  let s = 0x2545f491;
  const rand = (): number => {
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t ^= t + Math.imul(t ^ (t >>> 7), 61 | t);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const v: number[] = [
    0, -0, 1, -1, 0.1, 1 / 3, Infinity, -Infinity, NaN, 3.4028234663852886e38, -1.1754943508222875e-38,
    1.401298464324817e-45, 65504, 65519, 65520, 65536, 70000, 2 ** -14, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 2 ** -26,
    1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -8), 255.5, 256.5, 2049, 2051,
  ];
  for (let i = 0; i < 400; i++) {
    const u1 = rand() || 1e-12;
    const normal = Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * rand());
    v.push(normal * 10 ** Math.floor(rand() * 16 - 8));
  }
  // bit patterns exactly halfway between two bf16 values (low 16 bits 0x8000)
  for (let i = 0; i < 64; i++) {
    const bits = new Uint32Array([((Math.floor(rand() * 0xffff) << 16) | 0x8000) >>> 0]);
    v.push(new Float32Array(bits.buffer)[0] as number);
  }
  return new Float32Array(v);
}

function expectSameValues(actual: Float32Array, expected: ArrayLike<number>, label: string): void {
  expect(actual.length).toBe(expected.length);
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i] as number;
    const e = expected[i] as number;
    // Object.is tells -0 from 0 and equates NaN with NaN: the conversions must be exact.
    if (!Object.is(a, e)) expect.fail(`${label}[${i}]: got ${a}, expected ${e}`);
  }
}

function expectCode(fn: () => unknown, code: string, problem: RegExp, path?: string): void {
  let caught: unknown;
  try {
    fn();
  } catch (error) {
    caught = error;
  }
  expect(caught, "expected the call to throw").toBeInstanceOf(Error);
  const error = caught as Error & { code?: string };
  expect(error.code, error.message).toBe(code);
  if (path) expect(error.message.startsWith(`${path}: `), error.message).toBe(true);
  expect(error.message).toMatch(problem);
}

/** Writes [u64 N][header][data]; `declaredLength` overrides N. */
function writeRaw(label: string, header: string | Buffer, data: Buffer = Buffer.alloc(0), declaredLength?: bigint): string {
  const headerBytes = typeof header === "string" ? Buffer.from(header, "utf8") : header;
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(declaredLength ?? BigInt(headerBytes.length));
  const path = freshPath(label);
  writeFileSync(path, Buffer.concat([prefix, headerBytes, data]));
  return path;
}

describe("safetensors round trip", () => {
  const values = testValues();

  it("writes and reads F32 exactly", () => {
    const path = freshPath("f32");
    native.safetensorsWrite(path, [{ name: "w", dtype: "F32", shape: [values.length], data: values }]);
    expectSameValues(native.safetensorsReadF32(path, "w"), values, "F32");
  });

  it("rounds to BF16 to nearest even, as the JS reference does", () => {
    const path = freshPath("bf16");
    native.safetensorsWrite(path, [{ name: "w", dtype: "BF16", shape: [values.length], data: values }]);
    expectSameValues(native.safetensorsReadF32(path, "w"), Array.from(values, bf16Reference), "BF16");
    // Known encodings pin the byte layout (little-endian, top half of the float32): 1 -> 0x3f80,
    // 1 + 2^-8 is a tie -> 0x3f80 (even), 1 + 3*2^-8 is a tie -> 0x3f82 (even).
    const probe = freshPath("bf16-bytes");
    native.safetensorsWrite(probe, [{ name: "w", dtype: "BF16", shape: [3], data: new Float32Array([1, 1 + 2 ** -8, 1 + 3 * 2 ** -8]) }]);
    const bytes = readFileSync(probe);
    expect([...bytes.subarray(bytes.length - 6)]).toEqual([0x80, 0x3f, 0x80, 0x3f, 0x82, 0x3f]);
  });

  it("rounds to F16 to nearest even with overflow to inf and subnormals, as the JS reference does", () => {
    const path = freshPath("f16");
    native.safetensorsWrite(path, [{ name: "w", dtype: "F16", shape: [values.length], data: values }]);
    expectSameValues(native.safetensorsReadF32(path, "w"), Array.from(values, f16Reference), "F16");
    const probe = freshPath("f16-bytes");
    native.safetensorsWrite(probe, [{ name: "w", dtype: "F16", shape: [4], data: new Float32Array([1, -2, 65520, 2 ** -24]) }]);
    const bytes = readFileSync(probe);
    // 1 -> 0x3c00, -2 -> 0xc000, 65520 (tie above the max) -> inf 0x7c00, 2^-24 -> 0x0001
    expect([...bytes.subarray(bytes.length - 8)]).toEqual([0x00, 0x3c, 0x00, 0xc0, 0x00, 0x7c, 0x01, 0x00]);
  });

  it("lays the file out as the format says: padded header, declaration order, contiguous offsets", () => {
    const path = freshPath("layout");
    const a = new Float32Array([1, 2, 3, 4, 5, 6]);
    native.safetensorsWrite(
      path,
      [
        { name: "z.last", dtype: "BF16", shape: [2, 3], data: a },
        { name: "a.first", dtype: "F32", shape: [], data: new Float32Array([7]) },
        { name: "empty", dtype: "F16", shape: [0, 4], data: new Float32Array(0) },
        { name: 'snow\u2603 "quoted"', dtype: "F16", shape: [1], data: new Float32Array([0.5]) },
      ],
      { format: "pt", note: "line\nbreak" },
    );
    const file = readFileSync(path);
    const n = Number(file.readBigUInt64LE(0));
    expect(n % 8).toBe(0); // data section 8-byte aligned
    const headerText = file.subarray(8, 8 + n).toString("utf8");
    expect(headerText).toMatch(/} *$/); // padding is spaces only
    const header = JSON.parse(headerText) as Record<string, unknown>;
    expect(header["__metadata__"]).toEqual({ format: "pt", note: "line\nbreak" });
    expect(header["z.last"]).toEqual({ dtype: "BF16", shape: [2, 3], data_offsets: [0, 12] });
    expect(header["a.first"]).toEqual({ dtype: "F32", shape: [], data_offsets: [12, 16] });
    expect(header["empty"]).toEqual({ dtype: "F16", shape: [0, 4], data_offsets: [16, 16] });
    expect(header['snow\u2603 "quoted"']).toEqual({ dtype: "F16", shape: [1], data_offsets: [16, 18] });
    expect(file.length).toBe(8 + n + 18);

    const parsed = native.safetensorsHeader(path);
    expect(parsed.metadata).toEqual({ format: "pt", note: "line\nbreak" });
    expect(parsed.tensors.map((t) => [t.name, t.dtype, t.shape, t.begin, t.end])).toEqual([
      ["z.last", "BF16", [2, 3], 0, 12],
      ["a.first", "F32", [], 12, 16],
      ["empty", "F16", [0, 4], 16, 16],
      ['snow\u2603 "quoted"', "F16", [1], 16, 18],
    ]);
    expectSameValues(native.safetensorsReadF32(path, "a.first"), [7], "scalar");
    expect(native.safetensorsReadF32(path, "empty").length).toBe(0);
    expectSameValues(native.safetensorsReadF32(path, "z.last"), a, "bf16 integers");
  });

  it("replaces the target atomically and leaves no temp files", () => {
    const sub = join(dir, "atomic");
    mkdirSync(sub);
    const path = join(sub, "model.safetensors");
    native.safetensorsWrite(path, [{ name: "w", dtype: "F32", shape: [2], data: new Float32Array([1, 2]) }]);
    native.safetensorsWrite(path, [{ name: "v", dtype: "F32", shape: [1], data: new Float32Array([3]) }]);
    expect(native.safetensorsHeader(path).tensors.map((t) => t.name)).toEqual(["v"]);
    // Refused writes (data shorter than the shape, a reserved name) leave the previous file untouched.
    expectCode(
      () => native.safetensorsWrite(path, [{ name: "w", dtype: "F32", shape: [3], data: new Float32Array(2) }]),
      "INVALID_ARGUMENT",
      /data has 2 elements, shape needs 3/,
    );
    expectCode(
      () => native.safetensorsWrite(path, [{ name: "__metadata__", dtype: "F32", shape: [1], data: new Float32Array(1) }]),
      "INVALID_ARGUMENT",
      /reserved/,
    );
    expect(native.safetensorsHeader(path).tensors.map((t) => t.name)).toEqual(["v"]);
    expect(readdirSync(sub)).toEqual(["model.safetensors"]);
  });

  it("reads headers written by hand with escapes, whitespace and padding", () => {
    // \ud83d\ude00 is a surrogate pair (U+1F600); "\/" and "\t" are legal escapes.
    const header = ' {\n "__metadata__" : {"k\\/ey": "v\\tal"},\n "x\\ud83d\\ude00": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} }   ';
    const path = writeRaw("escapes", header, Buffer.from(new Float32Array([2.5]).buffer));
    const parsed = native.safetensorsHeader(path);
    expect(parsed.tensors.map((t) => t.name)).toEqual(["x\u{1F600}"]);
    expect(parsed.metadata).toEqual({ "k/ey": "v\tal" });
    expectSameValues(native.safetensorsReadF32(path, "x\u{1F600}"), [2.5], "escaped name");
  });
});

// ---------------------------------------------------------------------------------------------------
// Malformed files. Each builds the bytes by hand and expects INVALID_SAFETENSORS with a message that
// starts with the file's path and names the problem.

function expectInvalid(path: string, problem: RegExp): void {
  expectCode(() => native.safetensorsHeader(path), "INVALID_SAFETENSORS", problem, path);
  // Reading a tensor opens (and validates) the file the same way.
  expectCode(() => native.safetensorsReadF32(path, "w"), "INVALID_SAFETENSORS", problem, path);
}

const f32 = (name: string, shape: number[], begin: number, end: number): string =>
  `${JSON.stringify(name)}:{"dtype":"F32","shape":${JSON.stringify(shape)},"data_offsets":[${begin},${end}]}`;

describe("safetensors reader rejects malformed files", () => {
  it("rejects a file shorter than 8 bytes", () => {
    const path = freshPath("short");
    writeFileSync(path, Buffer.from([1, 0, 0, 0]));
    expectInvalid(path, /4 bytes, shorter than the 8-byte header length/);
  });

  it("rejects a header length above 100,000,000", () => {
    const path = writeRaw("huge-n", "{}", Buffer.alloc(0), 100_000_001n);
    expectInvalid(path, /header length 100000001 exceeds the limit of 100000000/);
  });

  it("rejects a header running past the end of the file", () => {
    const path = writeRaw("past-end", "{}", Buffer.alloc(0), 1000n);
    expectInvalid(path, /header length 1000 runs past the end of the file \(10 bytes\)/);
  });

  it.each([
    ["a stray 0xff byte", Buffer.from([0x7b, 0x22, 0x61, 0xff, 0x22, 0x3a, 0x7b, 0x7d, 0x7d])], // {"a\xff":{}}
    ["an overlong encoding of '/'", Buffer.from([0x7b, 0x22, 0xc0, 0xaf, 0x22, 0x3a, 0x7b, 0x7d, 0x7d])],
    ["an encoded UTF-16 surrogate", Buffer.from([0x7b, 0x22, 0xed, 0xa0, 0x80, 0x22, 0x3a, 0x7b, 0x7d, 0x7d])],
    ["a truncated sequence", Buffer.from([0x7b, 0x22, 0xe2, 0x98, 0x22, 0x3a, 0x7b, 0x7d, 0x7d])],
  ])("rejects a non-UTF-8 header (%s)", (_label, header) => {
    expectInvalid(writeRaw("utf8", header), /header is not valid UTF-8 \(bad byte at header offset \d+\)/);
  });

  it.each([
    ["truncated", '{"w": {'],
    ["trailing garbage", "{} x"],
    ["two documents", "{}{}"],
    ["a trailing comma", `{${f32("w", [1], 0, 4)},}`],
    ["single quotes", "{'w': 1}"],
    ["a leading zero", '{"w": {"dtype": "F32", "shape": [01], "data_offsets": [0, 4]}}'],
    ["a lone surrogate escape", '{"\\ud800": {}}'],
    ["a raw control character in a string", '{"a\u0001": {}}'],
    ["an invalid escape", '{"a\\x41": {}}'],
    ["a comment", "{/* c */}"],
    ["deep nesting", `{"__metadata__": ${"[".repeat(100)}${"]".repeat(100)}}`],
  ])("rejects a non-JSON header (%s)", (_label, header) => {
    expectInvalid(writeRaw("json", header, Buffer.alloc(4)), /header is not valid JSON: .* at byte \d+/);
  });

  it("rejects a header that is JSON but not an object", () => {
    expectInvalid(writeRaw("array", "[]"), /header is not a JSON object/);
  });

  it("rejects a field repeated inside a tensor entry (found by the reliability fuzzer)", () => {
    const path = writeRaw("repeated-field", '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"dtype":"U8"}}', Buffer.alloc(4));
    expectInvalid(path, /tensor 'w': duplicate key 'dtype'/);
  });

  it("rejects duplicate tensor names", () => {
    const path = writeRaw("duplicate", `{${f32("w", [1], 0, 4)},${f32("w", [1], 4, 8)}}`, Buffer.alloc(8));
    expectInvalid(path, /duplicate tensor name 'w'/);
  });

  it("rejects offsets that are not contiguous from 0", () => {
    const gap = writeRaw("gap", `{${f32("w", [1], 0, 4)},${f32("v", [1], 8, 12)}}`, Buffer.alloc(12));
    expectInvalid(gap, /tensor 'v': data_offsets not contiguous \(begins at 8, previous tensor ends at 4\)/);
    const late = writeRaw("late-start", `{${f32("w", [1], 4, 8)}}`, Buffer.alloc(8));
    expectInvalid(late, /tensor 'w': data_offsets not contiguous \(begins at 4, previous tensor ends at 0\)/);
  });

  it("rejects end < begin", () => {
    const path = writeRaw("backwards", `{${f32("w", [1], 0, 4)},${f32("v", [0], 4, 0)}}`, Buffer.alloc(4));
    expectInvalid(path, /tensor 'v': data_offsets end 0 < begin 4/);
  });

  it("rejects shape x dtype size different from end - begin", () => {
    const path = writeRaw("size", `{${f32("w", [2, 3], 0, 20)}}`, Buffer.alloc(20));
    expectInvalid(path, /tensor 'w': shape \[2,3\] of F32 needs 24 bytes but data_offsets span 20/);
  });

  it("rejects shape x dtype size overflowing 64 bits", () => {
    const path = writeRaw("overflow", `{${f32("w", [4294967296, 4294967296], 0, 0)}}`);
    expectInvalid(path, /tensor 'w': shape \[4294967296,4294967296\] x F32 size overflows/);
    const huge = writeRaw("overflow-dim", `{${f32("w", [1], 0, 4)}}`.replace("[1]", "[18446744073709551616]"), Buffer.alloc(4));
    expectInvalid(huge, /tensor 'w': shape entries must be non-negative integers/);
  });

  it("rejects trailing bytes after the data", () => {
    const path = writeRaw("trailing", `{${f32("w", [1], 0, 4)}}`, Buffer.alloc(7));
    expectInvalid(path, /3 trailing bytes after the last tensor/);
  });

  it("rejects a truncated file", () => {
    const good = freshPath("good");
    native.safetensorsWrite(good, [{ name: "w", dtype: "F32", shape: [16], data: new Float32Array(16) }]);
    const bytes = readFileSync(good);
    const path = freshPath("truncated");
    writeFileSync(path, bytes.subarray(0, bytes.length - 5));
    expectInvalid(path, /file is truncated: the data section needs 64 bytes but only 59 follow the header/);
  });

  it("rejects an unknown dtype", () => {
    const path = writeRaw("dtype", '{"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}', Buffer.alloc(1));
    expectInvalid(path, /tensor 'w': unknown dtype 'Q4'/);
  });

  it("rejects __metadata__ that is not a map of strings to strings", () => {
    const path = writeRaw("metadata", `{"__metadata__": {"epoch": 3},${f32("w", [1], 0, 4)}}`, Buffer.alloc(4));
    expectInvalid(path, /__metadata__ must be a map of strings to strings/);
    expectInvalid(writeRaw("metadata-list", '{"__metadata__": ["a"]}'), /__metadata__ must be a map of strings to strings/);
  });

  it("rejects malformed tensor entries", () => {
    expectInvalid(writeRaw("entry", '{"w": 5}'), /tensor 'w': entry is not a JSON object/);
    expectInvalid(writeRaw("no-offsets", '{"w": {"dtype": "F32", "shape": []}}'), /"data_offsets" must be two non-negative integers/);
    expectInvalid(
      writeRaw("neg-shape", '{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}'),
      /shape entries must be non-negative integers/,
    );
    expectInvalid(
      writeRaw("float-offset", '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}', Buffer.alloc(4)),
      /"data_offsets" must be two non-negative integers/,
    );
  });

  it("accepts every dtype the format defines, and refuses to convert the non-float ones", () => {
    const header =
      '{"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U16", "shape": [1], "data_offsets": [2, 4]}}';
    const path = writeRaw("dtypes", header, Buffer.alloc(4));
    expect(native.safetensorsHeader(path).tensors.map((t) => t.dtype)).toEqual(["F8_E4M3", "U16"]);
    expectCode(() => native.safetensorsReadF32(path, "b"), "UNSUPPORTED", /tensor 'b' has dtype U16, not a float type/, path);
  });
});

describe("safetensors errors that are not malformed files", () => {
  it("reports IO_ERROR for a missing file and for a directory", () => {
    const missing = join(dir, "does-not-exist.safetensors");
    expectCode(() => native.safetensorsHeader(missing), "IO_ERROR", /cannot open: No such file or directory/, missing);
    expectCode(() => native.safetensorsHeader(dir), "IO_ERROR", /not a regular file/, dir);
  });

  it("reports NOT_FOUND for a tensor the file does not have", () => {
    const path = freshPath("present");
    native.safetensorsWrite(path, [{ name: "w", dtype: "F32", shape: [1], data: new Float32Array(1) }]);
    expectCode(() => native.safetensorsReadF32(path, "nope"), "NOT_FOUND", /no tensor named 'nope'/, path);
  });

  it("reports INVALID_ARGUMENT for arguments of the wrong type", () => {
    expectCode(() => (native.safetensorsHeader as (p: unknown) => unknown)(42), "INVALID_ARGUMENT", /path must be a string/);
    expectCode(
      () => native.safetensorsWrite(join(dir, "x.safetensors"), [{ name: "w", dtype: "I8" as "F32", shape: [1], data: new Float32Array(1) }]),
      "INVALID_ARGUMENT",
      /dtype must be 'F32', 'F16' or 'BF16'/,
    );
  });
});
