// Sampling on the GPU: one block per row of float32 logits (V = 128256 for Llama 3), following the CPU
// sampler (cpu/sampler.cpp) rule for rule, including the order of its inverse-CDF walk, so that the
// same uniform u gives the same token. Nothing sorts the vocabulary: every step is a few passes over
// the row (which stays in L2) with block reductions and radix selections in shared memory.
//
// Per row, with x the row's logits (written back in place exactly as the CPU leaves them):
//   penalty      x[id] = x[id] < 0 ? x[id]·p : x[id] / p   once per distinct context id      (p != 1)
//   greedy       temperature <= 0 (or NaN): argmax of x, lowest id on ties, NaN never wins, none
//                above -inf: token 0
//   temperature  x = x / t, NaN → -inf; nothing above -inf: token 0
//   top-k        0 < k < V: S = {x >= the k-th largest finite x} (ties kept), or every token when
//                fewer than k are finite; otherwise S = every token
//   weights      w = exp_nonpositive(x − max x), the CPU's polynomial bit for bit, as fixed point
//                q = ⌊w·2^F⌋ (F = 63 − ⌈log2 V⌉, 46 for Llama 3: every w >= 2^-23 is exact)
//   top-p        top_p < 1: rank S by (x descending, id ascending); Z = Σ_S q, B = ⌈top_p·Z⌉; c* is the
//                first token in rank order whose cumulative weight reaches max(B, 1): the nucleus is
//                every token ranked up to c* (a token is kept iff the weight ranked before it is < B,
//                and the first is always kept)
//   draw         the CPU walks the kept set in the order it built it: without top-p, S in id order;
//                with top-p, first the tokens in CPU histogram bins before c*'s bin (4096 bins of
//                max − x over S's finite range) in id order, then c*'s bin in rank order. The token
//                is the first of that walk whose running weight exceeds R = ⌊u·Σ q⌋ (clamped to the
//                last positive weight).
//
// Agreement with the CPU: greedy is exact. A draw is exact except where the two sides' weights or sums
// round differently near a boundary: the CPU sums float weights in double (relative error ~1e-16 per
// add), the GPU sums exact fixed-point weights (weights below 2^-23 lose bits below 2^-46). So u·Σw
// must land within ~1e-12 relative of a cumulative-weight boundary (or top_p·Z of one) for the tokens
// to differ; a token whose weight is below 2^-46 (x < max − 31.9) cannot be drawn here (the CPU draws
// such a token with probability < V·2^-46 ≈ 2e-9). Out-of-range context ids are skipped (the CPU
// throws; the service validates ids first). +inf logits are outside the CPU's defined domain (its
// top-k binning divides by an infinite range); here a row whose weights are all 0 gives token 0.
#include <cstdint>
#include <string>

#include "cuda/ops.cuh"

namespace ts::cuda {

namespace {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int SAMPLE_THREADS = 1024;
constexpr int SAMPLE_WARPS = SAMPLE_THREADS / WARP;
constexpr int CPU_BINS = 4096;  // cpu/sampler.cpp's BINS: the top-p walk order depends on its bins
constexpr int RADIX = 256;      // digits per radix-selection level
constexpr int DIGIT_LANES = RADIX / WARP;
constexpr int COPIES = 8;       // histogram copies (lane % COPIES): one warp's atomics collide 4× at most
constexpr int NO_TOKEN = -1;

using u64 = unsigned long long;

// ---- the CPU's arithmetic, reproduced bit for bit --------------------------------------------------

// cpu/sampler.cpp's exp_nonpositive with every rounding step explicit (no FMA contraction), so the
// weights equal the CPU's. A NaN argument (inf − inf) gives 0, as x86's negative default NaN does there.
__device__ __forceinline__ float exp_nonpositive(float x) {
  constexpr uint32_t MINUS_87 = 0xc2ae0000u;  // the bits of -87.0f
  const uint32_t bits = __float_as_uint(x);
  const uint32_t under = (bits > MINUS_87 || x != x) ? 0xffffffffu : 0u;  // x < -87, -inf or NaN
  const float c = __uint_as_float((bits & ~under) | (MINUS_87 & under));
  const float n = __fadd_rn(__fadd_rn(__fmul_rn(c, 1.44269504088896341f), 12582912.f), -12582912.f);
  const float r = __fadd_rn(__fadd_rn(c, -__fmul_rn(n, 0.693359375f)), __fmul_rn(n, 2.12194440e-4f));
  float p = 1.9875691500e-4f;
  p = __fadd_rn(__fmul_rn(p, r), 1.3981999507e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 8.3334519073e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 4.1665795894e-2f);
  p = __fadd_rn(__fmul_rn(p, r), 1.6666665459e-1f);
  p = __fadd_rn(__fmul_rn(p, r), 5.0000001201e-1f);
  p = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.f);
  const float scale = __int_as_float((int(n) + 127) << 23);  // n in [-126, 0]
  return __uint_as_float(__float_as_uint(__fmul_rn(p, scale)) & ~under);
}

// cpu/sampler.cpp's Binning: bins of (max − x) over [min, max], bin 0 holding the max, -inf in bin BINS.
struct CpuBinning {
  float max_logit, scale;
  __device__ CpuBinning(float max_logit_, float min_logit) : max_logit(max_logit_) {
    const float range = __fadd_rn(max_logit_, -min_logit);
    scale = range > 0.f ? float(CPU_BINS - 1) / range : 0.f;
  }
  __device__ int operator()(float x) const {
    if (!(x > -INFINITY)) return CPU_BINS;
    const float t = __fmul_rn(__fadd_rn(max_logit, -x), scale);
    return t < float(CPU_BINS - 1) ? int(t) : CPU_BINS - 1;  // NaN (an infinite max) lands in the last bin
  }
};

// ---- fixed-point helpers --------------------------------------------------------------------------

// High 64 bits of a·b.
__device__ __forceinline__ u64 mul_hi_u64(u64 a, u64 b) {
  const u64 a_lo = a & 0xffffffffull, a_hi = a >> 32, b_lo = b & 0xffffffffull, b_hi = b >> 32;
  const u64 lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const u64 cross = (lo_lo >> 32) + (hi_lo & 0xffffffffull) + lo_hi;
  return hi_hi + (hi_lo >> 32) + (cross >> 32);
}

// f·2^64 for f in [0, 1) (exact for f a multiple of 2^-64: the sampler's u, every float top_p >= 2^-40).
__device__ __forceinline__ u64 fraction_bits(double f) {
  if (!(f > 0.0)) return 0;
  if (f >= 1.0) return ~0ull;
  return u64(f * 18446744073709551616.0);
}

// Orders floats as unsigned integers (−0 folded into +0 first: the CPU ranks them as equal values).
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  const uint32_t u = __float_as_uint(x == 0.f ? 0.f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_bits(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// Larger key = ranked earlier: value descending, then id ascending.
__device__ __forceinline__ u64 rank_key(float x, int id) {
  return (u64(ordered_bits(x)) << 32) | u64(0xffffffffu - uint32_t(id));
}

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
  for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

// ---- shared state of a row's block ----------------------------------------------------------------

struct SampleShared {
  u64 mass[RADIX][COPIES];       // radix level histograms: weight per digit
  unsigned count[RADIX][COPIES]; // candidates per digit
  int first_token[RADIX][COPIES]; // the candidate that found its count slot empty (the only one if the count is 1)
  u64 warp_total[SAMPLE_WARPS];  // weight of each warp's contiguous id range (id-order walks)
  float f_scratch[WARP];
  u64 u_scratch[WARP];
  int i_scratch[WARP];
  // Broadcast results of the one thread or warp that decides.
  int sel_digit;
  unsigned sel_count;
  int sel_token;  // the digit's only candidate when sel_count is 1
  u64 sel_before;
  int walk_warp;
  u64 walk_before;
  int token;
};

__device__ u64 block_sum_u64(u64 v, SampleShared& sh) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  v = warp_sum_u64(v);
  __syncthreads();
  if (lane == 0) sh.u_scratch[warp] = v;
  __syncthreads();
  return warp_sum_u64(lane < SAMPLE_WARPS ? sh.u_scratch[lane] : 0ull);
}

// ---- weights ----------------------------------------------------------------------------------------

// 1 per finite token: radix selection by count finds the k-th largest value.
struct CountWeight {
  __device__ u64 operator()(float x, int) const { return x > -INFINITY ? 1ull : 0ull; }
};

// The fixed-point softmax weight of tokens in the set S = {x >= threshold}; with `cut` >= 0 only those in
// CPU bins before `cut` (the id-ordered head of the top-p walk).
struct MassWeight {
  float max_logit, threshold, two_f;  // two_f = 2^F
  CpuBinning bins;
  int cut;
  __device__ u64 operator()(float x, int) const {
    if (!(x >= threshold)) return 0ull;
    if (cut >= 0 && bins(x) >= cut) return 0ull;
    return u64(exp_nonpositive(x - max_logit) * two_f);  // exact product (power of two), truncated
  }
};

// ---- selections -------------------------------------------------------------------------------------

// Monotone coarse digit (higher = larger x) over [lo, hi]: the first radix level, linear in the value so
// that the bulk of a logit distribution spreads over many digits (the float's top byte would put it in
// a handful and serialize the histogram atomics).
struct CoarseDigit {
  float hi, scale;
  __device__ int operator()(float x) const {
    const float t = (hi - x) * scale;
    return t < float(RADIX - 1) ? RADIX - 1 - int(t) : 0;  // -inf and NaN (infinite range) land in 0
  }
};

// After a histogram pass, warp 0 finds the first digit in descending order at which before + the
// running weight exceeds `target` and publishes it (sel_digit, sel_count, sel_token, sel_before). When
// none does (no candidate left, or target beyond the total), the last non-empty digit is taken; count 0
// then says there was no candidate at all.
__device__ void choose_digit(SampleShared& sh, u64 before, u64 target) {
  const int lane = threadIdx.x % WARP;
  if (threadIdx.x / WARP == 0) {
    u64 mass[DIGIT_LANES];
    unsigned count[DIGIT_LANES];
    u64 lane_total = 0;
#pragma unroll
    for (int e = 0; e < DIGIT_LANES; e++) {
      const int d = RADIX - 1 - (lane * DIGIT_LANES + e);
      u64 m = 0;
      unsigned c = 0;
#pragma unroll
      for (int k = 0; k < COPIES; k++) {
        m += sh.mass[d][k];
        c += sh.count[d][k];
      }
      mass[e] = m;
      count[e] = c;
      lane_total += m;
    }
    u64 inclusive = lane_total;
    for (int o = 1; o < WARP; o <<= 1) {
      const u64 y = __shfl_up_sync(FULL_MASK, inclusive, o);
      if (lane >= o) inclusive += y;
    }
    const u64 exclusive = inclusive - lane_total;
    const unsigned hits = __ballot_sync(FULL_MASK, before + inclusive > target);
    unsigned nonempty = 0;
#pragma unroll
    for (int e = 0; e < DIGIT_LANES; e++) nonempty |= count[e];
    const unsigned lanes_nonempty = __ballot_sync(FULL_MASK, nonempty != 0);
    const int chosen_lane = hits ? __ffs(int(hits)) - 1 : (lanes_nonempty ? 31 - __clz(int(lanes_nonempty)) : 0);
    if (lane == chosen_lane) {
      u64 acc = before + exclusive;
      int pick = -1;
#pragma unroll
      for (int e = 0; e < DIGIT_LANES; e++) {
        if (pick < 0 && hits && acc + mass[e] > target) pick = e;
        if (pick < 0) acc += mass[e];
      }
      if (pick < 0) {  // fallback: the last non-empty digit of this lane
        acc = before + exclusive;
        u64 acc_at_pick = acc;
        for (int e = 0; e < DIGIT_LANES; e++) {
          if (count[e]) {
            pick = e;
            acc_at_pick = acc;
          }
          acc += mass[e];
        }
        acc = acc_at_pick;
        if (pick < 0) pick = 0;
      }
      const int digit = RADIX - 1 - (lane * DIGIT_LANES + pick);
      int token = NO_TOKEN;
      for (int k = 0; k < COPIES; k++)
        if (sh.count[digit][k] == 1) token = sh.first_token[digit][k];
      sh.sel_digit = digit;
      sh.sel_count = count[pick];
      sh.sel_token = token;
      sh.sel_before = acc;
    }
  }
  __syncthreads();
}

struct Selection {
  int token;       // NO_TOKEN when there was no candidate
  uint32_t value;  // ordered bits of the selected value (valid with value_only even when token is unknown)
  u64 before;      // weight of the candidates ranked before the token
};

// The first candidate (weight > 0) in rank order (x descending, id ascending) whose cumulative weight
// exceeds `target`: a coarse level, then 8-bit digits of the 64-bit rank key, stopping as soon as one
// candidate is left. With value_only the id digits are skipped: the value is what the caller needs.
template <typename Weight>
__device__ Selection rank_select(const float* x, int V, const Weight& weight, u64 target, bool value_only,
                                 CoarseDigit coarse, SampleShared& sh) {
  const int lane = threadIdx.x % WARP, copy = lane % COPIES;
  u64 before = 0, prefix = 0, mask = 0;
  int coarse_digit = -1;
  const int last_shift = value_only ? 32 : 0;
  for (int shift = 64; shift >= last_shift; shift -= 8) {  // 64: the coarse level
    for (int i = threadIdx.x; i < RADIX * COPIES; i += blockDim.x) {
      (&sh.mass[0][0])[i] = 0;
      (&sh.count[0][0])[i] = 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float xi = x[i];
      const u64 w = weight(xi, i);
      if (w == 0) continue;
      const int cd = coarse(xi);
      int digit;
      if (shift == 64) {
        digit = cd;
      } else {
        const u64 key = rank_key(xi, i);
        if (cd != coarse_digit || (key & mask) != prefix) continue;
        digit = int((key >> shift) & (RADIX - 1));
      }
      atomicAdd(&sh.mass[digit][copy], w);
      if (atomicAdd(&sh.count[digit][copy], 1u) == 0u) sh.first_token[digit][copy] = i;  // one writer per slot
    }
    __syncthreads();
    choose_digit(sh, before, target);
    const int digit = sh.sel_digit;
    const unsigned count = sh.sel_count;
    before = sh.sel_before;
    const int token = sh.sel_token;
    __syncthreads();  // everyone has read sel_* before the next level overwrites them
    if (count == 0) return {NO_TOKEN, 0u, before};
    if (shift == 64) {
      coarse_digit = digit;
    } else {
      prefix |= u64(digit) << shift;
      mask |= u64(RADIX - 1) << shift;
    }
    if (count == 1) return {token, ordered_bits(x[token]), before};
  }
  if (value_only) return {NO_TOKEN, uint32_t(prefix >> 32), before};
  return {int(0xffffffffu - uint32_t(prefix)), uint32_t(prefix >> 32), before};
}

// Id-order walks split the vocabulary into one contiguous range per warp (a multiple of 32 ids).
__device__ __forceinline__ int warp_range(int V) {
  return (V + SAMPLE_WARPS * WARP - 1) / (SAMPLE_WARPS * WARP) * WARP;
}

// Σ weight over the row, and each warp's share in warp_total (what walk_id_order starts from).
template <typename Weight>
__device__ u64 weight_totals(const float* x, int V, const Weight& weight, SampleShared& sh) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, range = warp_range(V);
  const int begin = warp * range, end = min(V, begin + range);
  u64 part = 0;
  for (int i = begin + lane; i < end; i += WARP) part += weight(x[i], i);
  const u64 warp_total = warp_sum_u64(part);
  __syncthreads();  // warp_total may still be read by a previous walk
  if (lane == 0) sh.warp_total[warp] = warp_total;
  return block_sum_u64(part, sh);
}

// The first id whose running weight (ids ascending) exceeds target; needs weight_totals' warp_total of
// the same weight. Returns NO_TOKEN when target >= the total.
template <typename Weight>
__device__ int walk_id_order(const float* x, int V, const Weight& weight, u64 target, SampleShared& sh) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, range = warp_range(V);
  if (threadIdx.x == 0) {
    u64 before = 0;
    int found = -1;
    for (int w = 0; w < SAMPLE_WARPS && found < 0; w++) {
      if (before + sh.warp_total[w] > target) found = w;
      else before += sh.warp_total[w];
    }
    sh.walk_warp = found;
    sh.walk_before = before;
    sh.token = NO_TOKEN;
  }
  __syncthreads();
  if (warp == sh.walk_warp) {
    u64 before = sh.walk_before;
    const int begin = warp * range, end = min(V, begin + range);
    for (int base = begin; base < end; base += WARP) {
      const int i = base + lane;
      const u64 w = i < end ? weight(x[i], i) : 0ull;
      u64 inclusive = w;
      for (int o = 1; o < WARP; o <<= 1) {
        const u64 y = __shfl_up_sync(FULL_MASK, inclusive, o);
        if (lane >= o) inclusive += y;
      }
      const unsigned hits = __ballot_sync(FULL_MASK, before + inclusive > target);
      if (hits) {
        if (lane == 0) sh.token = base + __ffs(int(hits)) - 1;
        break;
      }
      before += __shfl_sync(FULL_MASK, inclusive, WARP - 1);
    }
  }
  __syncthreads();
  return sh.token;
}

// ---- the kernel -------------------------------------------------------------------------------------

__device__ void apply_repetition_penalty(float* x, int V, float penalty, const int32_t* context, int64_t count,
                                         uint32_t* seen) {
  const int words = (V + 31) / 32;
  for (int i = threadIdx.x; i < words; i += blockDim.x) seen[i] = 0u;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int id = context[i];
    if (id < 0 || id >= V) continue;
    const uint32_t bit = 1u << (id & 31);
    uint32_t* word = seen + (id >> 5);
    uint32_t old = *word, assumed;
    do {  // atomic OR: exactly one thread sets the bit, and only it penalises the id
      assumed = old;
      old = atomicCAS(word, assumed, assumed | bit);
    } while (old != assumed);
    if (old & bit) continue;
    const float v = x[id];
    x[id] = v < 0.f ? v * penalty : v / penalty;
  }
  __syncthreads();  // the penalised logits are visible to every thread
}

// argmax with the CPU's rules: lowest id among the largest values, NaN never wins, token 0 when no value
// is above -inf.
__device__ int greedy_token(const float* x, int V, SampleShared& sh) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  float best = -INFINITY;
  int best_id = INT32_MAX;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = x[i];
    if (v > best) {  // ids rise along a thread's stride: the first of equal values stays
      best = v;
      best_id = i;
    }
  }
  for (int o = WARP / 2; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(FULL_MASK, best, o);
    const int oi = __shfl_xor_sync(FULL_MASK, best_id, o);
    if (ob > best || (ob == best && oi < best_id)) {
      best = ob;
      best_id = oi;
    }
  }
  if (lane == 0) {
    sh.f_scratch[warp] = best;
    sh.i_scratch[warp] = best_id;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < SAMPLE_WARPS ? sh.f_scratch[lane] : -INFINITY;
    best_id = lane < SAMPLE_WARPS ? sh.i_scratch[lane] : INT32_MAX;
    for (int o = WARP / 2; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(FULL_MASK, best, o);
      const int oi = __shfl_xor_sync(FULL_MASK, best_id, o);
      if (ob > best || (ob == best && oi < best_id)) {
        best = ob;
        best_id = oi;
      }
    }
    if (lane == 0) sh.token = best > -INFINITY ? best_id : 0;
  }
  __syncthreads();
  return sh.token;
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(int32_t* ids,                 // (n)
                  float* logits,                // (n, V)
                  const DeviceSampleRow* rows,  // (n)
                  const int32_t* context,       // every row's context ids back to back
                  int V,
                  uint32_t* seen_bits,          // (n, ⌈V/32⌉) repetition-penalty bitmaps
                  int weight_bits) {            // F: weights are ⌊w·2^F⌋
  __shared__ SampleShared sh;
  const int64_t row = blockIdx.x;
  const DeviceSampleRow params = rows[row];
  float* x = logits + row * V;

  if (params.repetition_penalty != 1.f)
    apply_repetition_penalty(x, V, params.repetition_penalty, context + params.context_begin,
                             params.context_end - params.context_begin, seen_bits + row * ((V + 31) / 32));

  if (!(params.temperature > 0.f)) {
    const int token = greedy_token(x, V, sh);
    if (threadIdx.x == 0) ids[row] = token;
    return;
  }

  // Temperature (written back, as the CPU does), and the max, finite min and finite count.
  float hi = -INFINITY, lo = INFINITY;
  u64 finite = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    float v = x[i] / params.temperature;
    v = v == v ? v : -INFINITY;
    x[i] = v;
    hi = fmaxf(hi, v);
    if (v > -INFINITY) {
      lo = fminf(lo, v);
      finite++;
    }
  }
  hi = block_max(hi, sh.f_scratch);
  lo = -block_max(-lo, sh.f_scratch);
  finite = block_sum_u64(finite, sh);
  if (!(hi > -INFINITY)) {  // nothing finite: the CPU's draw returns the set's first token
    if (threadIdx.x == 0) ids[row] = 0;
    return;
  }
  const float range = hi - lo;
  const CoarseDigit coarse{hi, range > 0.f && range < INFINITY ? float(RADIX) / range : 0.f};

  // top-k: the k-th largest value (ties kept); with fewer than k finite tokens, every token stays.
  float threshold = -INFINITY;
  if (params.top_k > 0 && params.top_k < V && finite >= u64(params.top_k)) {
    const Selection kth = rank_select(x, V, CountWeight{}, u64(params.top_k - 1), true, coarse, sh);
    threshold = from_ordered_bits(kth.value);
  }
  const float set_min = threshold > -INFINITY ? threshold : lo;  // finite range of S, as the CPU bins it
  const float two_f = __int_as_float((weight_bits + 127) << 23);
  const MassWeight mass{hi, threshold, two_f, CpuBinning(hi, set_min), -1};
  const u64 total = weight_totals(x, V, mass, sh);
  int token = 0;
  if (total == 0) {
    token = 0;  // only with an infinite logit (see the top comment)
  } else if (!(params.top_p < 1.f)) {
    const u64 target = min(mul_hi_u64(fraction_bits(params.u), total), total - 1);
    token = walk_id_order(x, V, mass, target, sh);
  } else {
    // Nucleus: c* is the first token (rank order) whose cumulative weight reaches max(B, 1).
    const u64 p_bits = fraction_bits(params.top_p > 0.f ? double(params.top_p) : 0.0);
    const u64 budget = mul_hi_u64(p_bits, total) + (p_bits * total != 0ull ? 1ull : 0ull);  // ⌈top_p·Z⌉
    const u64 reach = budget > 0 ? budget - 1 : 0;
    const Selection last = rank_select(x, V, mass, reach, false, coarse, sh);
    if (last.token < 0) {  // unreachable while total > 0: some token carries weight
      if (threadIdx.x == 0) ids[row] = 0;
      return;
    }
    const u64 kept_total = last.before + mass(x[last.token], last.token);
    const int cut = mass.bins(x[last.token]);
    MassWeight head = mass;
    head.cut = cut;
    const u64 head_total = weight_totals(x, V, head, sh);
    const u64 target = min(mul_hi_u64(fraction_bits(params.u), kept_total), kept_total - 1);
    if (target < head_total) token = walk_id_order(x, V, head, target, sh);
    else token = rank_select(x, V, mass, target, false, coarse, sh).token;
  }
  if (threadIdx.x == 0) ids[row] = token >= 0 ? token : 0;
}

int penalty_words(int V) { return (V + 31) / 32; }

}  // namespace

size_t sample_scratch_bytes(int64_t n, int V) { return size_t(n) * size_t(penalty_words(V)) * sizeof(uint32_t); }

void sample_rows(int32_t* ids, float* logits, const DeviceSampleRow* rows, const int32_t* context, int64_t n, int V,
                 void* scratch, cudaStream_t stream) {
  require(V > 0, "INVALID_ARGUMENT", "sample_rows: empty logits");
  if (n <= 0) return;
  int id_bits = 0;  // ⌈log2 V⌉: Σ of V weights of at most 2^F stays below 2^63
  while ((int64_t(1) << id_bits) < V) id_bits++;
  const int weight_bits = 63 - id_bits < 62 ? 63 - id_bits : 62;
  TS_LAUNCH(sample_kernel, unsigned(n), SAMPLE_THREADS, 0, stream)(ids, logits, rows, context, V,
                                                                   static_cast<uint32_t*>(scratch), weight_bits);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ts::cuda
