// Next-token selection with Hugging Face generate() semantics (see sampler.h), sized for V = 128256:
// every step is O(V) passes; only top-p sorts, and only the tokens that can hold its boundary.
//
// Order, as transformers' GenerationMixin._get_logits_processor builds it: the processors first
// (RepetitionPenaltyLogitsProcessor), then, only when sampling (do_sample), the warpers in the order
// TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper; then softmax and one multinomial draw.
// Greedy (temperature 0 here, do_sample=False there) applies the penalty and takes the argmax.
//
//   penalty      x[id] = x[id] < 0 ? x[id] * p : x[id] / p   once per distinct id of the context
//   temperature  x = x / t
//   top-k        drop x[i] < (k-th largest x)                  ties with the k-th value are kept (as HF)
//   top-p        over softmax(kept x), most likely first: keep a token iff the probability of the tokens
//                ranked before it is < top_p (HF's "ascending cumsum <= 1 - top_p is removed"); the
//                first token is always kept (min_tokens_to_keep = 1)
//   draw         u ~ U[0,1) from the request's xoshiro256** stream (UniformSource), inverse CDF over the
//                kept tokens
//
// Ties in value are ranked by lower token id first (torch.sort's order among equal values is not
// specified). Weights are float32 exps (a few ulp from exact) summed in double, so a nucleus boundary
// that sits exactly on top_p may differ from HF's float32 cumsum by one token; nothing else does. NaN
// logits are replaced by -inf (never chosen while any other token is finite).
//
// Cost for V = 128256 (every path is a few O(V) passes; nothing sorts the vocabulary):
//   greedy   one pass (argmax)
//   sample   max, exp (vectorized, branch-free), one inverse-CDF walk
//   top-k    a 4096-bin histogram of the logits finds the bin of the k-th value; nth_element runs
//            inside that bin only
//   top-p    a histogram of the softmax mass by logit finds the bin holding the nucleus boundary;
//            only that bin's tokens are sorted
#include "cpu/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "core/error.h"

namespace ts::cpu {

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr int BINS = 4096;  // histogram resolution for the top-k / top-p selections

// exp(x) for x <= 0 (a logit minus the max), branch-free so loops over it vectorize: Cody–Waite
// reduction x = n·ln2 + r, |r| <= ln2/2, Cephes' polynomial for e^r, 2^n through the exponent bits.
// Relative error < 3e-7. x < -87 (-inf included) gives exactly 0, so such tokens are never drawn. The
// range test is an integer compare of the bit patterns (for x <= 0, a larger pattern is a more negative
// number): GCC does not if-convert float compares while FP exceptions may trap, its default.
inline float exp_nonpositive(float x) {
  constexpr uint32_t MINUS_87 = 0xc2ae0000u;  // the bits of -87.0f
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t under = 0u - uint32_t(bits > MINUS_87);  // all ones when x < -87
  const uint32_t clamped_bits = (bits & ~under) | (MINUS_87 & under);
  float c;
  std::memcpy(&c, &clamped_bits, 4);
  const float n = (c * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (c - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t scale_bits = (int32_t(n) + 127) << 23;  // n in [-126, 0]
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  const float e = p * scale;
  uint32_t e_bits;
  std::memcpy(&e_bits, &e, 4);
  e_bits &= ~under;
  float out;
  std::memcpy(&out, &e_bits, 4);
  return out;
}

struct Candidate {
  float logit;
  int32_t id;
};
// Most likely first; equal logits by lower id, so every ordering below is total and deterministic.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

// argmax with the lowest index on ties (torch.argmax returns the first maximal value); NaN never wins.
int32_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  float best_value = NEG_INF;
  for (int64_t i = 0; i < n; i++) {
    if (x[i] > best_value) {
      best_value = x[i];
      best = i;
    }
  }
  return int32_t(best);
}

void apply_repetition_penalty(float* logits, int V, float penalty, const std::vector<int32_t>& context) {
  // HF gathers, transforms and scatters once per position; repeated ids therefore get the penalty
  // once, which the bitmap of ids already penalized reproduces.
  thread_local std::vector<uint64_t> seen;
  seen.assign((size_t(V) + 63) / 64, 0);
  for (int32_t id : context) {
    if (id < 0 || id >= V)
      throw EngineError("INVALID_ARGUMENT", "sample_token: context token id " + std::to_string(id) +
                                                " is outside the vocabulary [0, " + std::to_string(V) + ")");
    uint64_t bit = 1ull << (id & 63);
    if (seen[id >> 6] & bit) continue;
    seen[id >> 6] |= bit;
    float& x = logits[id];
    x = x < 0.f ? x * penalty : x / penalty;
  }
}

// A token set as parallel arrays: logits x (n) and their token ids (nullptr: ids are 0..n-1).
struct TokenSet {
  const float* x = nullptr;
  const int32_t* ids = nullptr;
  int64_t n = 0;
  int32_t id(int64_t i) const { return ids ? ids[i] : int32_t(i); }
};

// Largest and smallest finite logit (max = -inf when none is finite).
void finite_range(const TokenSet& s, float* max_out, float* min_out) {
  float hi = NEG_INF, lo = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < s.n; i++) {
    const float x = s.x[i];
    if (x > NEG_INF) {
      hi = x > hi ? x : hi;
      lo = x < lo ? x : lo;
    }
  }
  *max_out = hi;
  *min_out = lo;
}

// Bins of (max - x) over the finite range, bin 0 holding the max; -inf goes to the extra bin BINS.
// The index is monotone in x: a token in a later bin has a strictly smaller logit.
struct Binning {
  float max_logit, scale;
  Binning(float max_logit_, float min_logit) : max_logit(max_logit_) {
    const float range = max_logit_ - min_logit;
    scale = range > 0 ? float(BINS - 1) / range : 0.f;
  }
  int operator()(float x) const { return x > NEG_INF ? std::min(BINS - 1, int((max_logit - x) * scale)) : BINS; }
};

// Softmax weights exp(x - max) of the set into w (n); returns their sum.
double softmax_weights(const TokenSet& s, float max_logit, std::vector<float>& w) {
  w.resize(size_t(s.n));
  for (int64_t i = 0; i < s.n; i++) w[i] = exp_nonpositive(s.x[i] - max_logit);  // vectorizes
  double total = 0;
  for (int64_t i = 0; i < s.n; i++) total += w[i];
  return total;
}

// Inverse CDF: the first index whose running weight exceeds u·Σw.
int64_t inverse_cdf(const float* w, int64_t n, double total, UniformSource& u) {
  const double target = u.next() * total;
  double acc = 0;
  int64_t last_positive = 0;
  for (int64_t i = 0; i < n; i++) {
    if (w[i] <= 0.f) continue;
    acc += w[i];
    last_positive = i;
    if (acc > target) return i;
  }
  return last_positive;  // u·Σw rounded up to Σw: the last token with any weight
}

// One draw from softmax over the set.
int32_t draw(const TokenSet& s, UniformSource& u) {
  const int32_t top = argmax(s.x, s.n);
  const float max_logit = s.x[top];
  if (!(max_logit > NEG_INF)) return s.id(top);  // nothing finite: no distribution, the first token
  thread_local std::vector<float> w;
  const double total = softmax_weights(s, max_logit, w);
  return s.id(inverse_cdf(w.data(), s.n, total, u));
}

// top-k: the tokens with x >= the k-th largest value (HF keeps ties), in id order, as parallel arrays.
void top_k(const float* logits, int V, int k, std::vector<float>& x_out, std::vector<int32_t>& ids_out) {
  const TokenSet all{logits, nullptr, V};
  float max_logit, min_logit;
  finite_range(all, &max_logit, &min_logit);
  float threshold = NEG_INF;  // fewer than k finite tokens: every token stays (-inf ones weigh 0)
  if (max_logit > NEG_INF) {
    const Binning bin(max_logit, min_logit);
    thread_local std::vector<int64_t> count;
    count.assign(BINS + 1, 0);
    for (int i = 0; i < V; i++) count[bin(logits[i])]++;
    int64_t above = 0;  // tokens in the bins before b
    int b = 0;
    while (b < BINS && above + count[b] < k) above += count[b++];
    if (b < BINS) {
      // The k-th largest is the (k - above)-th largest of bin b.
      thread_local std::vector<float> in_bin;
      in_bin.clear();
      for (int i = 0; i < V; i++)
        if (bin(logits[i]) == b) in_bin.push_back(logits[i]);
      const int64_t rank = k - above - 1;
      std::nth_element(in_bin.begin(), in_bin.begin() + rank, in_bin.end(), std::greater<float>());
      threshold = in_bin[rank];
    }
  }
  x_out.clear();
  ids_out.clear();
  for (int i = 0; i < V; i++) {
    if (logits[i] >= threshold) {
      x_out.push_back(logits[i]);
      ids_out.push_back(int32_t(i));
    }
  }
}

// top-p: the nucleus of the set into `out` (unordered but deterministic).
//
// A token is kept iff the mass ranked before it is < top_p·Z. The softmax mass is accumulated per bin;
// with b the first bin at which the cumulative mass reaches top_p·Z, every token of a bin before b is
// kept (less than top_p·Z ranks before it), every token after b is dropped (at least top_p·Z does), and
// only bin b's tokens are sorted for the exact walk.
void nucleus(const TokenSet& s, double top_p, std::vector<Candidate>& out) {
  out.clear();
  float max_logit, min_logit;
  finite_range(s, &max_logit, &min_logit);
  if (!(max_logit > NEG_INF)) {  // nothing finite: keep the set, draw() returns its first token
    for (int64_t i = 0; i < s.n; i++) out.push_back({s.x[i], s.id(i)});
    return;
  }
  const Binning bin(max_logit, min_logit);
  thread_local std::vector<float> w;
  const double total = softmax_weights(s, max_logit, w);
  thread_local std::vector<double> mass;
  mass.assign(BINS + 1, 0.0);
  for (int64_t i = 0; i < s.n; i++) mass[bin(s.x[i])] += w[i];
  const double budget = top_p * total;
  int cut = 0;
  double before_cut = 0;  // mass of the bins before `cut`
  for (; cut < BINS; cut++) {
    if (before_cut + mass[cut] >= budget) break;
    before_cut += mass[cut];
  }
  thread_local std::vector<Candidate> boundary;
  boundary.clear();
  for (int64_t i = 0; i < s.n; i++) {
    const int b = bin(s.x[i]);
    if (b < cut) out.push_back({s.x[i], s.id(i)});
    else if (b == cut) boundary.push_back({s.x[i], s.id(i)});
  }
  std::sort(boundary.begin(), boundary.end(), ranks_before);
  double prefix = before_cut;
  for (const Candidate& c : boundary) {
    if (!out.empty() && !(prefix < budget)) break;  // the tokens ranked before c already reach top_p
    out.push_back(c);
    prefix += exp_nonpositive(c.logit - max_logit);
  }
}

}  // namespace

int32_t sample_token(float* logits, int V, const SamplingParams& params, const std::vector<int32_t>& context,
                     UniformSource u) {
  require(V > 0, "INVALID_ARGUMENT", "sample_token: empty logits");
  if (params.repetition_penalty != 1.f) apply_repetition_penalty(logits, V, params.repetition_penalty, context);
  if (!(params.temperature > 0.f)) return argmax(logits, V);

  const float t = params.temperature;
  for (int i = 0; i < V; i++) {
    const float x = logits[i] / t;   // HF divides (exact when t == 1)
    logits[i] = x == x ? x : NEG_INF;  // NaN -> -inf; written as a compare so the loop vectorizes
  }
  const bool use_top_k = params.top_k > 0 && params.top_k < V;
  const bool use_top_p = params.top_p < 1.f;
  TokenSet set{logits, nullptr, V};
  thread_local std::vector<float> kept_x;
  thread_local std::vector<int32_t> kept_ids;
  if (use_top_k) {
    top_k(logits, V, params.top_k, kept_x, kept_ids);
    set = TokenSet{kept_x.data(), kept_ids.data(), int64_t(kept_x.size())};
  }
  if (!use_top_p) return draw(set, u);

  thread_local std::vector<Candidate> kept;
  nucleus(set, std::max(0.0, double(params.top_p)), kept);
  thread_local std::vector<float> nucleus_x;
  thread_local std::vector<int32_t> nucleus_ids;
  nucleus_x.resize(kept.size());
  nucleus_ids.resize(kept.size());
  for (size_t i = 0; i < kept.size(); i++) {
    nucleus_x[i] = kept[i].logit;
    nucleus_ids[i] = kept[i].id;
  }
  return draw(TokenSet{nucleus_x.data(), nucleus_ids.data(), int64_t(kept.size())}, u);
}

}  // namespace ts::cpu
