// CPU implementations of the Llama block ops declared in cpu/ops.h: float32, row-parallel on the pool.
#include "cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/thread_pool.h"

namespace ts::cpu {

void embedding_forward(float* out, const int32_t* ids, const float* table, int64_t M, int H) {
  for (int64_t m = 0; m < M; m++) std::memcpy(out + m * H, table + (int64_t)ids[m] * H, H * sizeof(float));
}

void add_inplace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t M, int H, float eps) {
  parallel_for(M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++) {
      const float* xm = x + m * H;
      float* om = out + m * H;
      double ss = 0;  // double accumulation: H up to 8192 terms
      for (int i = 0; i < H; i++) ss += (double)xm[i] * xm[i];
      float r = 1.0f / std::sqrt((float)(ss / H) + eps);
      if (rstd) rstd[m] = r;
      for (int i = 0; i < H; i++) om[i] = w[i] * (xm[i] * r);
    }
  });
}

void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, const float* rstd, int64_t M,
                      int H, bool accumulate) {
  // y_i = w_i x_i r, r = (mean(x²)+eps)^-1/2  =>  dx_i = r w_i dy_i - x_i r³/H Σ_j w_j dy_j x_j
  parallel_for(M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++) {
      const float* xm = x + m * H;
      const float* dm = dout + m * H;
      float* gm = dx + m * H;
      float r = rstd[m];
      double dot = 0;
      for (int i = 0; i < H; i++) dot += (double)w[i] * dm[i] * xm[i];
      float c = (float)(dot * r * r * r / H);
      for (int i = 0; i < H; i++) {
        float g = r * w[i] * dm[i] - xm[i] * c;
        gm[i] = accumulate ? gm[i] + g : g;
      }
    }
  });
}

void rope_apply(float* x, const int32_t* pos, const RopeView& rope, int64_t M, int nheads, bool inverse) {
  const int D = rope.D, half = D / 2;
  parallel_for(M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++) {
      const float* c = rope.cos + (int64_t)pos[m] * half;
      const float* s = rope.sin + (int64_t)pos[m] * half;
      float sign = inverse ? -1.f : 1.f;
      for (int h = 0; h < nheads; h++) {
        float* v = x + (m * nheads + h) * D;
        for (int i = 0; i < half; i++) {
          // rotate_half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); inverse uses -sin.
          float x1 = v[i], x2 = v[i + half], si = sign * s[i];
          v[i] = x1 * c[i] - x2 * si;
          v[i + half] = x2 * c[i] + x1 * si;
        }
      }
    }
  });
}

static inline float sigmoidf(float x) { return 1.f / (1.f + std::exp(-x)); }

void swiglu_forward(float* out, const float* gate, const float* up, int64_t M, int I) {
  parallel_for(M * I, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      float g = gate[i];
      out[i] = g * sigmoidf(g) * up[i];
    }
  });
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t M,
                     int I) {
  // h = silu(g) u ; silu'(g) = σ(g) (1 + g (1 - σ(g)))
  parallel_for(M * I, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      // Every input is read before an output is written: the op may run in place.
      const float g = gate[i], u = up[i], sg = sigmoidf(g), d = dout[i];
      dup[i] = d * g * sg;
      dgate[i] = d * u * sg * (1.f + g * (1.f - sg));
    }
  });
}

static inline float dot(const float* a, const float* b, int n) {
  float s = 0;
  for (int i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v, const AttentionShape& s) {
  const int B = s.B, T = s.T, NH = s.NH, NKV = s.NKV, D = s.D;
  const int32_t* doc_start = s.doc_start;
  const int G = NH / NKV;
  const int QD = NH * D, KVD = NKV * D;
  const float scale = 1.f / std::sqrt((float)D);
  // One work item per (b, h, t) row; rows of later t cost more, the pool's chunks even that out.
  parallel_for((int64_t)B * NH * T, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> p(T);
    for (int64_t it = begin; it < end; it++) {
      int t = it % T, h = (it / T) % NH, b = it / ((int64_t)T * NH);
      int kh = h / G;
      const int j0 = doc_start ? doc_start[(int64_t)b * T + t] : 0;
      const float* qt = q + ((int64_t)b * T + t) * QD + h * D;
      float mx = -std::numeric_limits<float>::infinity();
      for (int j = j0; j <= t; j++) {
        p[j] = dot(qt, k + ((int64_t)b * T + j) * KVD + kh * D, D) * scale;
        mx = std::max(mx, p[j]);
      }
      double sum = 0;
      for (int j = j0; j <= t; j++) {
        p[j] = std::exp(p[j] - mx);
        sum += p[j];
      }
      float inv = (float)(1.0 / sum);
      float* ot = out + ((int64_t)b * T + t) * QD + h * D;
      std::fill(ot, ot + D, 0.f);
      for (int j = j0; j <= t; j++) {
        float pj = p[j] * inv;
        const float* vj = v + ((int64_t)b * T + j) * KVD + kh * D;
        for (int d = 0; d < D; d++) ot[d] += pj * vj[d];
      }
      lse[((int64_t)b * NH + h) * T + t] = mx + (float)std::log(sum);
    }
  });
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                        const float* q, const float* k, const float* v, const AttentionShape& s) {
  const int B = s.B, T = s.T, NH = s.NH, NKV = s.NKV, D = s.D;
  const int32_t* doc_start = s.doc_start;
  const int G = NH / NKV;
  const int QD = NH * D, KVD = NKV * D;
  const float scale = 1.f / std::sqrt((float)D);
  // One work item per (b, kv head): it owns dk/dv of that head, so no two threads write the same row.
  // p_tj = exp(s_tj - lse_t); dP_tj = dout_t·v_j; dS_tj = p_tj (dP_tj - dout_t·out_t)
  // dq_t = scale Σ_j dS_tj k_j ; dk_j += scale dS_tj q_t ; dv_j += p_tj dout_t
  parallel_for((int64_t)B * NKV, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; it++) {
      int kh = it % NKV, b = it / NKV;
      for (int t = 0; t < T; t++) {
        float* dkr = dk + ((int64_t)b * T + t) * KVD + kh * D;
        float* dvr = dv + ((int64_t)b * T + t) * KVD + kh * D;
        std::fill(dkr, dkr + D, 0.f);
        std::fill(dvr, dvr + D, 0.f);
      }
      for (int h = kh * G; h < (kh + 1) * G; h++) {
        for (int t = 0; t < T; t++) {
          const int64_t row = ((int64_t)b * T + t) * QD + h * D;
          const float* qt = q + row;
          const float* dot_ = dout + row;
          float* dqt = dq + row;
          float delta = dot(dot_, out + row, D);
          float l = lse[((int64_t)b * NH + h) * T + t];
          std::fill(dqt, dqt + D, 0.f);
          const int j0 = doc_start ? doc_start[(int64_t)b * T + t] : 0;
          for (int j = j0; j <= t; j++) {
            const float* kj = k + ((int64_t)b * T + j) * KVD + kh * D;
            const float* vj = v + ((int64_t)b * T + j) * KVD + kh * D;
            float p = std::exp(dot(qt, kj, D) * scale - l);
            float ds = p * (dot(dot_, vj, D) - delta) * scale;
            float* dkj = dk + ((int64_t)b * T + j) * KVD + kh * D;
            float* dvj = dv + ((int64_t)b * T + j) * KVD + kh * D;
            for (int d = 0; d < D; d++) {
              dqt[d] += ds * kj[d];
              dkj[d] += ds * qt[d];
              dvj[d] += p * dot_[d];
            }
          }
        }
      }
    }
  });
}

void kv_write(const KVLayerView& kv, const float* k, const float* v, const int32_t* slot, int64_t M) {
  float* kc = static_cast<float*>(kv.k);
  float* vc = static_cast<float*>(kv.v);
  for (int64_t m = 0; m < M; m++) {
    std::memcpy(kc + (int64_t)slot[m] * kv.KVD, k + m * kv.KVD, kv.KVD * sizeof(float));
    std::memcpy(vc + (int64_t)slot[m] * kv.KVD, v + m * kv.KVD, kv.KVD * sizeof(float));
  }
}

void attention_paged(float* out, const float* q, const KVLayerView& kv, const PagedRows& rows, int64_t M, int NH,
                     int NKV, int D) {
  const int G = NH / NKV;
  const int KVD = kv.KVD, bs = kv.block_size;
  const float* kc = static_cast<const float*>(kv.k);
  const float* vc = static_cast<const float*>(kv.v);
  const float scale = 1.f / std::sqrt((float)D);
  parallel_for(M * NH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p;
    for (int64_t it = begin; it < end; it++) {
      int64_t m = it / NH;
      int h = it % NH, kh = h / G, n = rows.len[m];
      const int32_t* table = rows.block_tables + (int64_t)rows.row_seq[m] * rows.max_blocks;
      // cache row of position j of this sequence
      auto at = [&](int j) { return ((int64_t)table[j / bs] * bs + j % bs) * KVD + kh * D; };
      p.resize(n);
      const float* qt = q + (m * NH + h) * D;
      float mx = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < n; j++) {
        p[j] = dot(qt, kc + at(j), D) * scale;
        mx = std::max(mx, p[j]);
      }
      double sum = 0;
      for (int j = 0; j < n; j++) {
        p[j] = std::exp(p[j] - mx);
        sum += p[j];
      }
      float inv = (float)(1.0 / sum);
      float* ot = out + (m * NH + h) * D;
      std::fill(ot, ot + D, 0.f);
      for (int j = 0; j < n; j++) {
        float pj = p[j] * inv;
        const float* vj = vc + at(j);
        for (int d = 0; d < D; d++) ot[d] += pj * vj[d];
      }
    }
  });
}

void gather_rows(float* out, const float* in, const int32_t* index, int64_t n, int64_t cols) {
  for (int64_t i = 0; i < n; i++) std::memcpy(out + i * cols, in + (int64_t)index[i] * cols, cols * sizeof(float));
}

void scatter_rows(float* out, const float* in, const int32_t* index, int64_t n, int64_t cols) {
  for (int64_t i = 0; i < n; i++) std::memcpy(out + (int64_t)index[i] * cols, in + i * cols, cols * sizeof(float));
}

double cross_entropy_forward_backward(float* logits, const int32_t* targets, int64_t M, int V, float scale) {
  std::vector<double> row_loss(M, 0.0);
  parallel_for(M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++) {
      float* lm = logits + m * V;
      int32_t y = targets[m];
      if (y < 0) {
        if (scale != 0.f) std::fill(lm, lm + V, 0.f);
        continue;
      }
      float mx = *std::max_element(lm, lm + V);
      float target_logit = lm[y];
      double sum = 0;
      if (scale != 0.f) {
        // One exp per logit, kept in place for the gradient.
        for (int i = 0; i < V; i++) {
          lm[i] = std::exp(lm[i] - mx);
          sum += lm[i];
        }
        float s = (float)(scale / sum);
        for (int i = 0; i < V; i++) lm[i] *= s;
        lm[y] -= scale;
      } else {
        for (int i = 0; i < V; i++) sum += std::exp(lm[i] - mx);
      }
      row_loss[m] = mx + std::log(sum) - target_logit;
    }
  });
  double total = 0;
  for (double l : row_loss) total += l;
  return total;
}

void sum_squares(double* acc, const float* x, int64_t n) {
  double sq = *acc;  // one running sum across calls: the order of additions is the parameters' order
  for (int64_t i = 0; i < n; i++) sq += (double)x[i] * x[i];
  *acc = sq;
}

void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& s) {
  const float b1 = s.beta1, b2 = s.beta2;
  for (int64_t i = 0; i < n; i++) {
    float gi = g[i] * s.clip;
    p[i] *= s.decay;
    m[i] = b1 * m[i] + (1.f - b1) * gi;
    v[i] = b2 * v[i] + (1.f - b2) * gi * gi;
    p[i] -= s.step_size * m[i] / (std::sqrt(v[i]) / s.sqrt_bc2 + s.eps);
  }
}

}  // namespace ts::cpu
