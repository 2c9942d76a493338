#!/usr/bin/python3
"""Reference NF4 quantization (QLoRA, Dettmers et al. 2023) with double-quantized absmax, in numpy.

Written from the paper / bitsandbytes semantics and native/core/nf4.h, independently of nf4.cpp; the
test (test/nf4.test.ts) requires the two to agree bit for bit, so every step is float32 arithmetic
(numpy float32 ops are IEEE correctly rounded, like the C++ ones):

  blocks of 64 consecutive weights (row-major), absmax = max |w| per block
  index  = number of float32 midpoints m_i = (L_i + L_{i+1}) * 0.5 with  w / absmax > m_i
           (strict ">": a value exactly on a midpoint takes the lower level, as in bitsandbytes'
           decision tree, `if (x > 0.8614784f) return 15; else return 14;`); blocks with absmax 0 get index 7 (level 0.0)
  double quantization of absmax: mean = float32(sequential float64 sum / nblocks); d = absmax - mean;
           per group of 256 blocks scale = max |d|; q = rint(127 * d / scale) in [-127, 127]
           (0 when scale is 0); absmax' = mean + q * (scale / 127)

Usage: nf4_ref.py MANIFEST.json, where the manifest is a list of
  {"input": path of rows*cols little-endian float32, "rows": R, "cols": C, "output": prefix}
and for each entry it writes prefix + .codes.u8 (one index per weight), .absmax.f32, .absmax_q.i8,
.absmax_dq.f32, .scales.f32 and .mean.f32.
"""
import json
import sys

import numpy as np

LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
MIDPOINTS = (LEVELS[:-1] + LEVELS[1:]) * np.float32(0.5)  # (15) float32
BLOCK = 64
GROUP = 256


def quantize(w, rows, cols):
    assert cols % BLOCK == 0 and w.dtype == np.float32 and w.size == rows * cols
    blocks = w.reshape(-1, BLOCK)                       # (nblocks, 64)
    nblocks = blocks.shape[0]
    absmax = np.abs(blocks).max(axis=1) if nblocks else np.zeros(0, np.float32)  # (nblocks)

    codes = np.full(blocks.shape, 7, dtype=np.uint8)    # (nblocks, 64)
    nonzero = absmax > 0
    with np.errstate(divide="raise", invalid="raise", under="ignore"):  # w/absmax may underflow to 0
        x = blocks[nonzero] / absmax[nonzero, None]     # float32 division, in [-1, 1]
    codes[nonzero] = (x[:, :, None] > MIDPOINTS[None, None, :]).sum(axis=2).astype(np.uint8)

    # np.cumsum accumulates sequentially in block order, matching the C++ loop exactly.
    mean = np.float32(np.cumsum(absmax.astype(np.float64))[-1] / np.float64(nblocks)) if nblocks else np.float32(0)
    d = absmax - mean                                   # (nblocks) float32
    ngroups = (nblocks + GROUP - 1) // GROUP
    scales = np.zeros(ngroups, dtype=np.float32)        # (ngroups)
    q = np.zeros(nblocks, dtype=np.int8)                # (nblocks)
    dq = np.zeros(nblocks, dtype=np.float32)            # (nblocks)
    for g in range(ngroups):
        part = slice(g * GROUP, min((g + 1) * GROUP, nblocks))
        scale = np.abs(d[part]).max()
        scales[g] = scale
        if scale != 0:
            qf = np.rint((np.float32(127) * d[part]) / scale)  # round half to even
            q[part] = np.clip(qf, -127, 127).astype(np.int8)
        dq[part] = mean + q[part].astype(np.float32) * (scale / np.float32(127))
    return codes.reshape(-1), absmax, q, dq, scales, mean


def main():
    with open(sys.argv[1]) as f:
        manifest = json.load(f)
    for case in manifest:
        w = np.fromfile(case["input"], dtype="<f4")
        codes, absmax, q, dq, scales, mean = quantize(w, case["rows"], case["cols"])
        prefix = case["output"]
        codes.astype(np.uint8).tofile(prefix + ".codes.u8")
        absmax.astype("<f4").tofile(prefix + ".absmax.f32")
        q.astype(np.int8).tofile(prefix + ".absmax_q.i8")
        dq.astype("<f4").tofile(prefix + ".absmax_dq.f32")
        scales.astype("<f4").tofile(prefix + ".scales.f32")
        np.array([mean], dtype="<f4").tofile(prefix + ".mean.f32")
    print("nf4_ref: %d cases" % len(manifest))


if __name__ == "__main__":
    main()
