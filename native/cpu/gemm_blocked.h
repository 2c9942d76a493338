// The cache-blocked sgemm loop nest (BLIS / Goto), shared by the per-ISA kernel files. Each of them
// defines TS_TARGET (its __attribute__((target(...)))) and a Tile struct with the micro-kernel, the
// packing routines and the blocking, then includes this header: everything here has internal linkage,
// so each file gets its own copy compiled for its instruction set and no inline function leaks across ISAs.
//
// For C[i0:i1, j0:j1] (one thread):
//   for jc in columns, step NC:
//     for pc in K, step KC:                     beta applies on the first K panel only
//       pack op(B)[pc:pc+KC, jc:jc+NC] into NR-wide slivers   (k-major inside a sliver: [k][NR])
//       for ic in rows, step MC:
//         pack op(A)[ic:ic+MC, pc:pc+KC] into MR-tall slivers  ([k][MR]), rows balanced over the tiles
//         Tile::A_RESIDENT:   for ir: for jr    A sliver (MR x KC) stays in L1, the B panel streams
//                                               from L2 (the AVX-512 choice: its 14 KiB sliver fits)
//         otherwise:          for jr: for ir    B sliver (KC x NR) stays in L1, A block from L2, the
//                                               next B sliver prefetched into L2 meanwhile
//           micro-kernel: C[mv x nv] (=|+=) alpha * Apack·Bpack (+ beta*C)
// Packing pads partial slivers with zeros, so the micro-kernel reads full slivers and only its stores
// are masked.
#pragma once
#ifndef TS_TARGET
#error "define TS_TARGET before including gemm_blocked.h"
#endif

#include <algorithm>

#include "cpu/gemm_kernels.h"

namespace ts::cpu::detail {
namespace {

template <class Tile>
TS_TARGET void gemm_block_t(const GemmProblem& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  constexpr int MR = Tile::MR, NR = Tile::NR;
  constexpr int64_t KC = Tile::KC, MC = Tile::MC, NC = Tile::NC;
  static_assert(MC % MR == 0 && NC % NR == 0, "blocking must be a multiple of the tile");
  float* b_pack = scratch(0, size_t(KC * NC));  // (NC/NR slivers, KC, NR)
  float* a_pack = scratch(1, size_t(KC * MC));  // (MC/MR slivers, KC, MR)
  for (int64_t jc = j0; jc < j1; jc += NC) {
    const int64_t nc = std::min(NC, j1 - jc);
    for (int64_t pc = 0; pc < p.K; pc += KC) {
      const int64_t kc = std::min(KC, p.K - pc);
      const float beta = pc == 0 ? p.beta : 1.f;
      for (int64_t jr = 0; jr < nc; jr += NR)
        Tile::pack_b(p, pc, kc, jc + jr, int(std::min<int64_t>(NR, nc - jr)), b_pack + jr * kc);
      for (int64_t ic = i0; ic < i1; ic += MC) {
        const int64_t mc = std::min(MC, i1 - ic);
        // Row tiles of near-equal height (16 rows -> 8 + 8, not 14 + 2): the kernel computes only the
        // rows a tile has, and a very short tile has too few accumulator chains to keep the FMAs busy.
        const int64_t tiles = (mc + MR - 1) / MR;
        auto tile_row = [&](int64_t t) { return t * (mc / tiles) + std::min(t, mc % tiles); };
        for (int64_t t = 0; t < tiles; t++)
          Tile::pack_a(p.a, ic + tile_row(t), int(tile_row(t + 1) - tile_row(t)), pc, kc, a_pack + t * MR * kc);
        if constexpr (Tile::A_RESIDENT) {
          // The A sliver (MR x KC) stays in L1 while the B slivers stream past it from L2.
          for (int64_t t = 0; t < tiles; t++) {
            const int64_t ir = tile_row(t);
            const int mv = int(tile_row(t + 1) - ir);
            for (int64_t jr = 0; jr < nc; jr += NR) {
              const int nv = int(std::min<int64_t>(NR, nc - jr));
              float* c = p.c + (ic + ir) * p.ldc + jc + jr;
              Tile::kernel(kc, a_pack + t * MR * kc, b_pack + jr * kc, c, p.ldc, p.alpha, beta, mv, nv);
            }
          }
          continue;
        }
        // The B sliver (KC x NR) stays in L1 while the A slivers stream past it from L2. While the
        // kernels of sliver jr run, pull sliver jr+1 of the B panel (in L3 when the panel is larger
        // than L2) into L2, a slice per kernel, so its first kernel does not stall.
        const int64_t lines = kc * NR * int64_t(sizeof(float)) / 64, lines_per_tile = (lines + tiles - 1) / tiles;
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int nv = int(std::min<int64_t>(NR, nc - jr));
          const char* next = jr + NR < nc ? reinterpret_cast<const char*>(b_pack + (jr + NR) * kc) : nullptr;
          for (int64_t t = 0; t < tiles; t++) {
            if (next)
              for (int64_t l = t * lines_per_tile; l < std::min(lines, (t + 1) * lines_per_tile); l++)
                __builtin_prefetch(next + 64 * l, 0, 2);
            const int64_t ir = tile_row(t);
            const int mv = int(tile_row(t + 1) - ir);
            float* c = p.c + (ic + ir) * p.ldc + jc + jr;
            Tile::kernel(kc, a_pack + t * MR * kc, b_pack + jr * kc, c, p.ldc, p.alpha, beta, mv, nv);
          }
        }
      }
    }
  }
}

// Scalar packing, used by every ISA for the cases it does not vectorize (and by the scalar set).

// dst[k*MR + r] = op(A)(i + r, k0 + k), zero for r >= mv.
template <int MR>
TS_TARGET void pack_a_generic(const Operand& a, int64_t i, int mv, int64_t k0, int64_t kc, float* dst) {
  for (int64_t k = 0; k < kc; k++) {
    float* d = dst + k * MR;
    if (a.trans) {
      const float* src = a.data + (k0 + k) * a.ld + i;
      for (int r = 0; r < mv; r++) d[r] = src[r];
    } else {
      for (int r = 0; r < mv; r++) d[r] = a.data[(i + r) * a.ld + k0 + k];
    }
    for (int r = mv; r < MR; r++) d[r] = 0.f;
  }
}

// dst[k*NR + c] = op(B)(k0 + k, j + c), zero for c >= nv; float or NF4 B.
template <int NR>
TS_TARGET void pack_b_generic(const GemmProblem& p, int64_t k0, int64_t kc, int64_t j, int nv, float* dst) {
  if (p.b_nf4) {
    const NF4View& w = *p.b_nf4;
    Nf4Absmax absmax(w);
    for (int64_t k = 0; k < kc; k++) {
      float* d = dst + k * NR;
      for (int c = 0; c < nv; c++) {
        // W[row, col] with (row, col) = (j + c, k0 + k) when transposed, else (k0 + k, j + c)
        const int64_t row = p.b_nf4_trans ? j + c : k0 + k, col = p.b_nf4_trans ? k0 + k : j + c;
        const int64_t e = row * w.cols + col;
        const uint8_t byte = w.codes[size_t(e >> 1)];
        d[c] = NF4_LEVELS[(e & 1) ? (byte & 15) : (byte >> 4)] * absmax(e / NF4_BLOCK);
      }
      for (int c = nv; c < NR; c++) d[c] = 0.f;
    }
    return;
  }
  const Operand& b = p.b;
  for (int64_t k = 0; k < kc; k++) {
    float* d = dst + k * NR;
    if (b.trans) {
      for (int c = 0; c < nv; c++) d[c] = b.data[(j + c) * b.ld + k0 + k];
    } else {
      const float* src = b.data + (k0 + k) * b.ld + j;
      for (int c = 0; c < nv; c++) d[c] = src[c];
    }
    for (int c = nv; c < NR; c++) d[c] = 0.f;
  }
}

}  // namespace
}  // namespace ts::cpu::detail
