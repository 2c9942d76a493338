// Kernel lab for the CPU matrix product: times the engine's sgemm (build/Release/tuneserve_native.node)
// on the model's shapes next to PyTorch on the same machine, and prints GFLOP/s side by side.
//
//   node bench/kernels/gemm.mjs [--seconds 0.5] [--rounds 3] [--threads N] [--shapes lmhead,decode,...]
//                               [--no-torch] [--openblas] [--json out.json]
//
// PyTorch runs in /usr/bin/python3 with torch.set_num_threads(os.cpu_count()) and must be linked to
// OpenBLAS (the script checks /proc/self/maps and prints OpenBLAS's core name). OpenBLAS 0.3.21 does not
// know newer Xeons (CPUID model 207 here) and falls back to its "Prescott" SSE3 kernels, so when the
// default core is not an AVX-512 one the lab also runs PyTorch with OPENBLAS_CORETYPE=SkylakeX: that
// is the fair comparison. --openblas also times the engine's own dlopen'ed OpenBLAS path.
// Each shape is timed `rounds` times, alternating engine and PyTorch, and the best round counts
// (the machine is shared; the best time is the least disturbed one).
import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import os from "node:os";
import { createInterface } from "node:readline";

const args = process.argv.slice(2);
const opt = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
};
const flag = (name) => args.includes(`--${name}`);
const seconds = Number(opt("seconds", "0.5"));
const rounds = Number(opt("rounds", "3"));
const threads = Number(opt("threads", String(os.availableParallelism())));

// [label, transA, transB, M, N, K]. Model shapes: a linear layer y = x·Wᵀ is (false, true); its input
// gradient dy·W is (false, false); its weight gradient dyᵀ·x is (true, false).
const SHAPES = {
  prefill: [
    ["x·Wᵀ 512x256x256", false, true, 512, 256, 256],
    ["x·Wᵀ 512x512x512", false, true, 512, 512, 512],
    ["x·Wᵀ 512x1024x1024", false, true, 512, 1024, 1024],
    ["x·Wᵀ 512x2048x2048", false, true, 512, 2048, 2048],
    ["x·Wᵀ 512x4096x4096", false, true, 512, 4096, 4096],
    ["x·Wᵀ 512x14336x4096 (8B up)", false, true, 512, 14336, 4096],
  ],
  backward: [
    ["dy·W 512x1024x1024", false, false, 512, 1024, 1024],
    ["dyᵀ·x 1024x1024x512", true, false, 1024, 1024, 512],
    ["dy·W 512x2048x2048", false, false, 512, 2048, 2048],
  ],
  lmhead: [
    ["lm_head 512x128256x256", false, true, 512, 128256, 256],
    ["lm_head 128x128256x2048 (1B)", false, true, 128, 128256, 2048],
  ],
  decode: [
    ["decode 1x2048x2048", false, true, 1, 2048, 2048],
    ["decode 1x4096x4096", false, true, 1, 4096, 4096],
    ["decode 1x14336x4096", false, true, 1, 14336, 4096],
    ["decode lm_head 1x128256x256", false, true, 1, 128256, 256],
    ["decode lm_head 1x128256x2048", false, true, 1, 128256, 2048],
  ],
  smallm: [
    ["4x4096x4096", false, true, 4, 4096, 4096],
    ["8x4096x4096", false, true, 8, 4096, 4096],
    ["16x4096x4096", false, true, 16, 4096, 4096],
    ["64x4096x4096", false, true, 64, 4096, 4096],
  ],
};
const groups = opt("shapes", Object.keys(SHAPES).join(",")).split(",");
const shapes = groups.flatMap((g) => {
  if (!SHAPES[g]) throw new Error(`unknown shape group ${g} (have ${Object.keys(SHAPES).join(", ")})`);
  return SHAPES[g];
});

const native = createRequire(import.meta.url)("../../build/Release/tuneserve_native.node");
native.setThreads(threads);

function fill(n, seed) {
  const a = new Float32Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) {
    s = (s * 1664525 + 1013904223) >>> 0;
    a[i] = s / 2 ** 32 - 0.5;
  }
  return a;
}

// Seconds per call of the engine's sgemm: calls repeated for `seconds`, best of 3 batches.
function timeEngine([, ta, tb, M, N, K], bufs) {
  const { A, B, C } = bufs;
  const lda = ta ? M : K, ldb = tb ? K : N;
  const call = () => native.sgemm(ta, tb, M, N, K, 1, A, lda, B, ldb, 0, C, N);
  call();
  let best = Infinity;
  for (let batch = 0; batch < 3; batch++) {
    let n = 0;
    const t0 = process.hrtime.bigint();
    let dt = 0;
    do {
      call();
      n++;
      dt = Number(process.hrtime.bigint() - t0) / 1e9;
    } while (dt < seconds / 3);
    best = Math.min(best, dt / n);
  }
  return best;
}

// A PyTorch timing server: reads one JSON shape per line, answers one JSON line with seconds per call.
const TORCH_SCRIPT = String.raw`
import ctypes, json, os, sys, time
import torch
torch.set_num_threads(os.cpu_count())
seconds = float(sys.argv[1])
maps = open('/proc/self/maps').read()
blas = sorted({l.split()[-1] for l in maps.splitlines() if 'blas' in l.split()[-1].lower()})
core = None
for path in blas:
    try:
        lib = ctypes.CDLL(path)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        core = lib.openblas_get_corename().decode()
        break
    except Exception:
        pass
print(json.dumps({'torch': torch.__version__, 'threads': torch.get_num_threads(), 'blas': blas, 'openblas_core': core}), flush=True)
for line in sys.stdin:
    label, ta, tb, M, N, K = json.loads(line)
    a = torch.rand(K, M).t() if ta else torch.rand(M, K)   # same memory layout as the engine's operands
    b = torch.rand(N, K).t() if tb else torch.rand(K, N)
    c = torch.empty(M, N)
    torch.matmul(a, b, out=c)
    best = float('inf')
    for batch in range(3):
        n, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b, out=c); n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / 3: break
        best = min(best, dt / n)
    del a, b, c
    print(json.dumps(best), flush=True)
`;

// The environment this lab was started with (before --openblas sets OPENBLAS_CORETYPE for itself).
const startEnv = { ...process.env };

// Starts a PyTorch server; returns { info, time(shape) -> Promise<seconds>, close() }.
async function torchServer(env) {
  const child = spawn("/usr/bin/python3", ["-c", TORCH_SCRIPT, String(seconds)], {
    env: { ...startEnv, ...env },
    stdio: ["pipe", "pipe", "inherit"],
  });
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const next = async () => {
    const { value, done } = await lines.next();
    if (done) throw new Error("the PyTorch timing process ended early");
    return JSON.parse(value);
  };
  const info = await next();
  return {
    info,
    time: async (shape) => {
      child.stdin.write(JSON.stringify(shape) + "\n");
      return next();
    },
    close: () => child.stdin.end(),
  };
}

const gflops = (s, t) => (2 * s[3] * s[4] * s[5]) / t / 1e9;
const useTorch = !flag("no-torch");

const engineBest = shapes.map(() => Infinity);
const blasBest = shapes.map(() => Infinity);
const torchDefaultBest = shapes.map(() => Infinity), torchSkxBest = shapes.map(() => Infinity);
const ownKernel = native.gemmKernelName();
const torchDefault = useTorch ? await torchServer({}) : null;
const torchSkx =
  torchDefault && !/skylakex|cooperlake|sapphirerapids/i.test(torchDefault.info.openblas_core ?? "")
    ? await torchServer({ OPENBLAS_CORETYPE: "SkylakeX" })
    : null;

// Per round and shape, the engine and the PyTorch runs follow each other within a second or two, so
// they see the same background load.
for (let round = 0; round < rounds; round++) {
  for (const [i, s] of shapes.entries()) {
    const [, , , M, N, K] = s;
    const bufs = { A: fill(M * K, 1), B: fill(N * K, 2), C: new Float32Array(M * N) };
    engineBest[i] = Math.min(engineBest[i], timeEngine(s, bufs));
    if (flag("openblas")) {
      if (!process.env.OPENBLAS_CORETYPE) process.env.OPENBLAS_CORETYPE = "SkylakeX"; // read when dlopen'ed
      if (native.setGemmKernel("openblas")) {
        blasBest[i] = Math.min(blasBest[i], timeEngine(s, bufs));
        native.setGemmKernel("auto");
      }
    }
    if (torchDefault) torchDefaultBest[i] = Math.min(torchDefaultBest[i], await torchDefault.time(s));
    if (torchSkx) torchSkxBest[i] = Math.min(torchSkxBest[i], await torchSkx.time(s));
  }
}
torchDefault?.close();
torchSkx?.close();

const cpu = os.cpus()[0]?.model ?? "?";
console.log(`machine: ${cpu}, ${os.availableParallelism()} cores; engine threads ${native.numThreads()}, kernel ${ownKernel}`);
if (torchDefault) {
  const t = torchDefault.info;
  console.log(`torch ${t.torch}, threads ${t.threads}, BLAS ${t.blas.join(" ")}, OpenBLAS core ${t.openblas_core}` +
    (torchSkx ? ` (also run with OPENBLAS_CORETYPE=SkylakeX -> core ${torchSkx.info.openblas_core})` : ""));
}
const rows = shapes.map((s, i) => {
  const row = { shape: s[0], engine: gflops(s, engineBest[i]) };
  if (flag("openblas")) row.engineOpenblas = gflops(s, blasBest[i]);
  if (torchDefault) row.torch = gflops(s, torchDefaultBest[i]);
  if (torchSkx) row.torchSkylakeX = gflops(s, torchSkxBest[i]);
  return row;
});
const cols = Object.keys(rows[0]).slice(1);
const header = ["shape".padEnd(32), ...cols.map((c) => c.padStart(14)), ...(torchDefault ? ["ratio".padStart(8)] : [])];
console.log(header.join(" "));
for (const r of rows) {
  const best = Math.max(r.torch ?? 0, r.torchSkylakeX ?? 0);
  console.log([r.shape.padEnd(32), ...cols.map((c) => r[c].toFixed(1).padStart(14)), ...(torchDefault ? [(r.engine / best).toFixed(2).padStart(8)] : [])].join(" "));
}
console.log("GFLOP/s (2·M·N·K / best time); ratio = engine / the faster PyTorch column");
const json = opt("json", null);
if (json) writeFileSync(json, JSON.stringify({ machine: cpu, date: new Date().toISOString(), kernel: ownKernel, torch: torchDefault?.info, torchSkylakeX: torchSkx?.info, rows }, null, 2));
