// Llama 3 passes (llama.h): the training forward/backward with per-layer recompute, and inference
// over KV caches. Everything is float32; the base is frozen, so the backward computes activation
// gradients through it and parameter gradients only for LoRA A/B.
#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "cpu/gemm.h"

namespace ts {

using namespace cpu;

// ---------------------------------------------------------------------------------------------- rope

void rope_tables(const LlamaConfig& cfg, int64_t P, std::vector<float>* cos_out, std::vector<float>* sin_out) {
  const int half = cfg.D / 2;
  // transformers computes inv_freq and the angles in float32; so do we, for parity.
  std::vector<float> inv(half);
  for (int i = 0; i < half; i++) {
    float expo = (float)(2 * i) / (float)cfg.D;
    inv[i] = 1.0f / (float)std::pow((double)cfg.rope_theta, (double)expo);
  }
  if (cfg.rope_llama3) {
    const float orig = (float)cfg.rope_original_max_pos;
    const float low_wavelen = orig / cfg.rope_low_freq_factor;
    const float high_wavelen = orig / cfg.rope_high_freq_factor;
    for (int i = 0; i < half; i++) {
      float wavelen = 2.0f * (float)M_PI / inv[i];
      float f = wavelen > low_wavelen ? inv[i] / cfg.rope_factor : inv[i];
      bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
      if (medium) {
        float s = (orig / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor);
        f = (1.0f - s) * f / cfg.rope_factor + s * f;
      }
      inv[i] = f;
    }
  }
  cos_out->resize((size_t)P * half);
  sin_out->resize((size_t)P * half);
  for (int64_t p = 0; p < P; p++)
    for (int i = 0; i < half; i++) {
      float angle = (float)p * inv[i];
      (*cos_out)[p * half + i] = (float)std::cos((double)angle);
      (*sin_out)[p * half + i] = (float)std::sin((double)angle);
    }
}

void LlamaModel::ensure_rope(int64_t positions) {
  if (rope.P >= positions) return;
  require(positions <= w.cfg.max_pos, "INVALID_ARGUMENT",
          "sequence position " + std::to_string(positions - 1) + " is beyond max_position_embeddings " +
              std::to_string(w.cfg.max_pos));
  // Grow geometrically so decoding does not rebuild the tables every token.
  int64_t P = std::min<int64_t>(w.cfg.max_pos, std::max<int64_t>(positions, std::max<int64_t>(256, rope.P * 2)));
  rope_tables(w.cfg, P, &rope_cos, &rope_sin);
  rope.D = w.cfg.D;
  rope.P = P;
  rope.cos = rope_cos.data();
  rope.sin = rope_sin.data();
}

// ------------------------------------------------------------------------------------------ training

int64_t TrainBatch::count_targets() const {
  int64_t n = 0;
  for (int b = 0; b < B; b++)
    for (int t = 1; t < T; t++) n += labels[(size_t)b * T + t] != -100;
  return n;
}

namespace {

// A linear module of the block with its LoRA path: y = x·Wᵀ (+ s·B·A·dropout(x)).
void project(float* y, const float* x, const LayerWeights& lw, int64_t M, const std::vector<LoraSegment>& segs,
             int layer, int target, const DropoutContext* drop) {
  linear_forward(y, x, lw.lin[target], M, 0.f);
  lora_forward(y, x, segs, layer, target, drop);
}

// dx (+)= dy·W and LoRA gradients of the module (adapter may be null: base only).
void project_backward(float* dx, bool accumulate, const float* dy, const float* x, const LayerWeights& lw, int64_t M,
                      LoraAdapter* adapter, int layer, int target, const DropoutContext* drop) {
  linear_backward_input(dx, dy, lw.lin[target], M, accumulate ? 1.f : 0.f);
  if (adapter) lora_backward(dx, *adapter, dy, x, M, layer, target, drop);
}

// Activations of one layer's forward that its backward needs.
struct LayerActs {
  std::vector<float> xn1, rstd1;  // (M,H), (M)
  std::vector<float> q, k, v;     // (M,NH*D), (M,NKV*D) x2, rotated q/k
  std::vector<float> att, lse;    // (M,NH*D), (B,NH,T)
  std::vector<float> x2;          // (M,H) residual after attention
  std::vector<float> xn2, rstd2;  // (M,H), (M)
  std::vector<float> g, u, h;     // (M,I) gate, up, silu(gate)*up
  void alloc(const LlamaConfig& c, int B, int T) {
    const int64_t M = (int64_t)B * T;
    xn1.resize(M * c.H); rstd1.resize(M);
    q.resize(M * c.NH * c.D); k.resize(M * c.NKV * c.D); v.resize(M * c.NKV * c.D);
    att.resize(M * c.NH * c.D); lse.resize((int64_t)B * c.NH * T);
    x2.resize(M * c.H); xn2.resize(M * c.H); rstd2.resize(M);
    g.resize(M * c.I); u.resize(M * c.I); h.resize(M * c.I);
  }
};

struct TrainContext {
  const LlamaModel& m;
  const LlamaConfig& c;
  int B, T;
  int64_t M;
  std::vector<int32_t> pos;  // (M)
  std::vector<LoraSegment> segs;
  LoraAdapter* adapter;
  const DropoutContext* drop;
};

// x_out[M,H] = block(x_in)
void layer_forward(TrainContext& tc, int l, LayerActs& a, const float* x_in, float* x_out) {
  const LlamaConfig& c = tc.c;
  const LayerWeights& lw = tc.m.w.layers[l];
  const int64_t M = tc.M;
  rmsnorm_forward(a.xn1.data(), a.rstd1.data(), x_in, lw.attn_norm.data(), M, c.H, c.rms_eps);
  project(a.q.data(), a.xn1.data(), lw, M, tc.segs, l, Q, tc.drop);
  project(a.k.data(), a.xn1.data(), lw, M, tc.segs, l, K, tc.drop);
  project(a.v.data(), a.xn1.data(), lw, M, tc.segs, l, V_PROJ, tc.drop);
  rope_apply(a.q.data(), tc.pos.data(), tc.m.rope, M, c.NH, false);
  rope_apply(a.k.data(), tc.pos.data(), tc.m.rope, M, c.NKV, false);
  attention_forward(a.att.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(), tc.B, tc.T, c.NH, c.NKV, c.D);
  project(a.x2.data(), a.att.data(), lw, M, tc.segs, l, O, tc.drop);
  for (int64_t i = 0; i < M * c.H; i++) a.x2[i] += x_in[i];
  rmsnorm_forward(a.xn2.data(), a.rstd2.data(), a.x2.data(), lw.mlp_norm.data(), M, c.H, c.rms_eps);
  project(a.g.data(), a.xn2.data(), lw, M, tc.segs, l, GATE, tc.drop);
  project(a.u.data(), a.xn2.data(), lw, M, tc.segs, l, UP, tc.drop);
  swiglu_forward(a.h.data(), a.g.data(), a.u.data(), M, c.I);
  project(x_out, a.h.data(), lw, M, tc.segs, l, DOWN, tc.drop);
  for (int64_t i = 0; i < M * c.H; i++) x_out[i] += a.x2[i];
}

// Scratch of the backward, shared by all layers.
struct LayerGrads {
  std::vector<float> dh, dg, du;   // (M,I)
  std::vector<float> dxn;          // (M,H)
  std::vector<float> datt, dq;     // (M,NH*D)
  std::vector<float> dk, dv;       // (M,NKV*D)
  void alloc(const LlamaConfig& c, int64_t M) {
    dh.resize(M * c.I); dg.resize(M * c.I); du.resize(M * c.I);
    dxn.resize(M * c.H);
    datt.resize(M * c.NH * c.D); dq.resize(M * c.NH * c.D);
    dk.resize(M * c.NKV * c.D); dv.resize(M * c.NKV * c.D);
  }
};

// On entry dx[M,H] = dL/d(x_out); on exit dx = dL/d(x_in).
void layer_backward(TrainContext& tc, int l, const LayerActs& a, const float* x_in, float* dx, LayerGrads& g) {
  const LlamaConfig& c = tc.c;
  const LayerWeights& lw = tc.m.w.layers[l];
  const int64_t M = tc.M;
  LoraAdapter* ad = tc.adapter;
  // MLP: x_out = x2 + down(silu(gate(xn2)) * up(xn2))
  project_backward(g.dh.data(), false, dx, a.h.data(), lw, M, ad, l, DOWN, tc.drop);
  swiglu_backward(g.dg.data(), g.du.data(), g.dh.data(), a.g.data(), a.u.data(), M, c.I);
  project_backward(g.dxn.data(), false, g.dg.data(), a.xn2.data(), lw, M, ad, l, GATE, tc.drop);
  project_backward(g.dxn.data(), true, g.du.data(), a.xn2.data(), lw, M, ad, l, UP, tc.drop);
  rmsnorm_backward(dx, g.dxn.data(), a.x2.data(), lw.mlp_norm.data(), a.rstd2.data(), M, c.H, true);  // dx = dL/dx2
  // Attention: x2 = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1)))
  project_backward(g.datt.data(), false, dx, a.att.data(), lw, M, ad, l, O, tc.drop);
  attention_backward(g.dq.data(), g.dk.data(), g.dv.data(), g.datt.data(), a.att.data(), a.lse.data(), a.q.data(),
                     a.k.data(), a.v.data(), tc.B, tc.T, c.NH, c.NKV, c.D);
  rope_apply(g.dq.data(), tc.pos.data(), tc.m.rope, M, c.NH, true);
  rope_apply(g.dk.data(), tc.pos.data(), tc.m.rope, M, c.NKV, true);
  project_backward(g.dxn.data(), false, g.dq.data(), a.xn1.data(), lw, M, ad, l, Q, tc.drop);
  project_backward(g.dxn.data(), true, g.dk.data(), a.xn1.data(), lw, M, ad, l, K, tc.drop);
  project_backward(g.dxn.data(), true, g.dv.data(), a.xn1.data(), lw, M, ad, l, V_PROJ, tc.drop);
  rmsnorm_backward(dx, g.dxn.data(), x_in, lw.attn_norm.data(), a.rstd1.data(), M, c.H, true);  // dx = dL/dx_in
}

void embed_rows(const LlamaWeights& w, const int32_t* ids, int64_t M, float* x) {
  const int H = w.cfg.H;
  for (int64_t m = 0; m < M; m++) {
    require(ids[m] >= 0 && ids[m] < w.cfg.V, "INVALID_ARGUMENT",
            "token id " + std::to_string(ids[m]) + " is outside the vocabulary [0, " + std::to_string(w.cfg.V) + ")");
    std::memcpy(x + m * H, w.embed.data() + (int64_t)ids[m] * H, H * sizeof(float));
  }
}

}  // namespace

double llama_train_pass(LlamaModel& m, LoraAdapter* adapter, const TrainBatch& batch, const TrainPassOptions& opt) {
  const LlamaConfig& c = m.w.cfg;
  const int B = batch.B, T = batch.T;
  const int64_t M = (int64_t)B * T;
  require(B > 0 && T > 0 && (int64_t)batch.ids.size() == M && (int64_t)batch.labels.size() == M, "INVALID_ARGUMENT",
          "train batch shape does not match its ids/labels");
  m.ensure_rope(T);
  TrainContext tc{m, c, B, T, M, std::vector<int32_t>(M), {{0, M, adapter}}, opt.backward ? adapter : nullptr,
                  opt.dropout.p > 0 ? &opt.dropout : nullptr};
  for (int64_t i = 0; i < M; i++) tc.pos[i] = (int32_t)(i % T);
  // Position t predicts labels[t + 1] (the shift Hugging Face applies inside the loss).
  std::vector<int32_t> targets(M, -100);
  for (int b = 0; b < B; b++)
    for (int t = 0; t + 1 < T; t++) targets[(int64_t)b * T + t] = batch.labels[(int64_t)b * T + t + 1];

  // Forward. layer_in[l] holds the input of layer l (and layer_in[L] the final residual stream).
  std::vector<std::vector<float>> layer_in(c.L + 1, std::vector<float>(M * c.H));
  embed_rows(m.w, batch.ids.data(), M, layer_in[0].data());
  const bool keep_all = opt.backward && !opt.recompute;
  std::vector<LayerActs> acts(keep_all ? c.L : 1);
  for (auto& a : acts) a.alloc(c, B, T);
  for (int l = 0; l < c.L; l++)
    layer_forward(tc, l, acts[keep_all ? l : 0], layer_in[l].data(), layer_in[l + 1].data());

  std::vector<float> xnf(M * c.H), rstdf(M);
  rmsnorm_forward(xnf.data(), rstdf.data(), layer_in[c.L].data(), m.w.final_norm.data(), M, c.H, c.rms_eps);

  // Chunked cross-entropy over the rows that have a target (prompt and padding rows are skipped:
  // their logits are never computed). At most ce_chunk_rows rows of (V) logits exist at a time.
  std::vector<int64_t> scored;
  for (int64_t i = 0; i < M; i++)
    if (targets[i] != -100) scored.push_back(i);
  const int64_t chunk = std::max(1, opt.ce_chunk_rows);
  const float* lm_head = m.w.lm_head_ptr();
  std::vector<float> logits(chunk * c.V), xs(chunk * c.H), dxs(chunk * c.H);
  std::vector<int32_t> ys(chunk);
  std::vector<float> dxnf(opt.backward ? M * c.H : 0, 0.f);
  double loss = 0;
  for (int64_t r0 = 0; r0 < (int64_t)scored.size(); r0 += chunk) {
    const int64_t rows = std::min<int64_t>(chunk, (int64_t)scored.size() - r0);
    for (int64_t i = 0; i < rows; i++) {
      std::memcpy(xs.data() + i * c.H, xnf.data() + scored[r0 + i] * c.H, c.H * sizeof(float));
      ys[i] = targets[scored[r0 + i]];
    }
    sgemm(false, true, rows, c.V, c.H, 1.f, xs.data(), c.H, lm_head, c.H, 0.f, logits.data(), c.V);
    loss += cross_entropy_forward_backward(logits.data(), ys.data(), rows, c.V, opt.backward ? opt.loss_scale : 0.f);
    if (!opt.backward) continue;
    sgemm(false, false, rows, c.H, c.V, 1.f, logits.data(), c.V, lm_head, c.H, 0.f, dxs.data(), c.H);
    for (int64_t i = 0; i < rows; i++)
      std::memcpy(dxnf.data() + scored[r0 + i] * c.H, dxs.data() + i * c.H, c.H * sizeof(float));
  }
  if (!opt.backward) return loss;

  // Backward, last layer first; with recompute each layer's forward is run again from its saved input.
  std::vector<float> dx(M * c.H);
  rmsnorm_backward(dx.data(), dxnf.data(), layer_in[c.L].data(), m.w.final_norm.data(), rstdf.data(), M, c.H, false);
  LayerGrads grads;
  grads.alloc(c, M);
  std::vector<float> scratch_out(opt.recompute ? M * c.H : 0);
  for (int l = c.L - 1; l >= 0; l--) {
    LayerActs& a = acts[keep_all ? l : 0];
    if (!keep_all) layer_forward(tc, l, a, layer_in[l].data(), scratch_out.data());
    layer_backward(tc, l, a, layer_in[l].data(), dx.data(), grads);
  }
  return loss;
}

// ----------------------------------------------------------------------------------------- inference

void KVCache::init(const LlamaConfig& cfg, int64_t capacity) {
  L = cfg.L;
  KVD = cfg.NKV * cfg.D;
  cap = capacity;
  len = 0;
  k.assign((size_t)L * cap * KVD, 0.f);
  v.assign((size_t)L * cap * KVD, 0.f);
}

void llama_infer(LlamaModel& m, const std::vector<InferenceRow>& rows, const std::vector<LoraSegment>& segments,
                 const std::vector<int64_t>& logit_rows, float* logits) {
  const LlamaConfig& c = m.w.cfg;
  const int64_t M = (int64_t)rows.size();
  if (M == 0) return;
  const int KVD = c.NKV * c.D, QD = c.NH * c.D;
  std::vector<int32_t> ids(M), pos(M), len(M);
  int32_t max_pos = 0;
  for (int64_t i = 0; i < M; i++) {
    ids[i] = rows[i].token;
    pos[i] = rows[i].pos;
    len[i] = rows[i].pos + 1;
    require(rows[i].pos < rows[i].cache->cap, "RESOURCE_EXHAUSTED", "KV cache of a sequence is full");
    max_pos = std::max(max_pos, rows[i].pos);
  }
  m.ensure_rope(max_pos + 1);
  std::vector<float> x(M * c.H), xn(M * c.H), q(M * QD), k(M * KVD), v(M * KVD), att(M * QD), tmp(M * c.H);
  std::vector<float> g(M * c.I), u(M * c.I);
  std::vector<const float*> k_rows(M), v_rows(M);
  embed_rows(m.w, ids.data(), M, x.data());
  for (int l = 0; l < c.L; l++) {
    const LayerWeights& lw = m.w.layers[l];
    rmsnorm_forward(xn.data(), nullptr, x.data(), lw.attn_norm.data(), M, c.H, c.rms_eps);
    project(q.data(), xn.data(), lw, M, segments, l, Q, nullptr);
    project(k.data(), xn.data(), lw, M, segments, l, K, nullptr);
    project(v.data(), xn.data(), lw, M, segments, l, V_PROJ, nullptr);
    rope_apply(q.data(), pos.data(), m.rope, M, c.NH, false);
    rope_apply(k.data(), pos.data(), m.rope, M, c.NKV, false);
    for (int64_t i = 0; i < M; i++) {
      KVCache* kc = rows[i].cache;
      std::memcpy(kc->k_at(l, pos[i]), k.data() + i * KVD, KVD * sizeof(float));
      std::memcpy(kc->v_at(l, pos[i]), v.data() + i * KVD, KVD * sizeof(float));
      k_rows[i] = kc->k_at(l, 0);
      v_rows[i] = kc->v_at(l, 0);
    }
    attention_decode(att.data(), q.data(), k_rows.data(), v_rows.data(), len.data(), M, c.NH, c.NKV, c.D);
    project(tmp.data(), att.data(), lw, M, segments, l, O, nullptr);
    for (int64_t i = 0; i < M * c.H; i++) x[i] += tmp[i];
    rmsnorm_forward(xn.data(), nullptr, x.data(), lw.mlp_norm.data(), M, c.H, c.rms_eps);
    project(g.data(), xn.data(), lw, M, segments, l, GATE, nullptr);
    project(u.data(), xn.data(), lw, M, segments, l, UP, nullptr);
    swiglu_forward(g.data(), g.data(), u.data(), M, c.I);
    project(tmp.data(), g.data(), lw, M, segments, l, DOWN, nullptr);
    for (int64_t i = 0; i < M * c.H; i++) x[i] += tmp[i];
  }
  for (int64_t i = 0; i < M; i++) rows[i].cache->len = std::max<int64_t>(rows[i].cache->len, pos[i] + 1);
  const int64_t n = (int64_t)logit_rows.size();
  if (n == 0) return;
  std::vector<float> xl(n * c.H), xnl(n * c.H);
  for (int64_t i = 0; i < n; i++) std::memcpy(xl.data() + i * c.H, x.data() + logit_rows[i] * c.H, c.H * sizeof(float));
  rmsnorm_forward(xnl.data(), nullptr, xl.data(), m.w.final_norm.data(), n, c.H, c.rms_eps);
  sgemm(false, true, n, c.V, c.H, 1.f, xnl.data(), c.H, m.w.lm_head_ptr(), c.H, 0.f, logits, c.V);
}

void llama_logits(LlamaModel& m, const LoraAdapter* adapter, const int32_t* ids, int T, float* logits) {
  KVCache cache;
  cache.init(m.w.cfg, T);
  std::vector<InferenceRow> rows(T);
  std::vector<int64_t> all(T);
  for (int t = 0; t < T; t++) {
    rows[t] = {&cache, t, ids[t]};
    all[t] = t;
  }
  llama_infer(m, rows, {{0, T, adapter}}, all, logits);
}

}  // namespace ts
