// Llama 3 passes (llama.h) over the backend interface. The base is frozen, so the backward computes
// activation gradients through it and parameter gradients only for LoRA A/B. The order of the ops is
// the CPU oracle's: a backend that computes each op exactly reproduces it bit for bit.
#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace ts {

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
  const LlamaConfig& c = cfg();
  require(positions <= c.max_pos, "INVALID_ARGUMENT",
          "sequence position " + std::to_string(positions - 1) + " is beyond max_position_embeddings " +
              std::to_string(c.max_pos));
  // Grow geometrically so decoding does not rebuild the tables every token.
  int64_t P = std::min<int64_t>(c.max_pos, std::max<int64_t>(positions, std::max<int64_t>(256, rope.P * 2)));
  std::vector<float> cos, sin;
  rope_tables(c, P, &cos, &sin);
  const size_t half_bytes = cos.size() * sizeof(float);
  Buffer storage(*be, 2 * half_bytes);
  float* dcos = static_cast<float*>(storage.data());
  float* dsin = reinterpret_cast<float*>(static_cast<char*>(storage.data()) + half_bytes);
  be->upload(dcos, cos.data(), half_bytes);
  be->upload(dsin, sin.data(), half_bytes);
  be->synchronize();  // the old tables may still be read by queued work until here
  rope_storage = std::move(storage);
  rope = RopeView{c.D, P, dcos, dsin};
}

// ----------------------------------------------------------------------------------- shared helpers

namespace {

// The LoRA of one (layer, target) over all rows of a training pass (one adapter).
LoraApply training_lora(const AdapterTensors* adapter, int64_t M, int layer, int target, const DropoutContext& drop) {
  LoraApply a;
  if (!adapter) return a;
  const LoraModuleView& mv = adapter->mod(layer, target).view;
  if (!mv.A) return a;
  a.segments.push_back({0, M, mv});
  a.max_rank = mv.r;
  a.dropout = drop.at(layer, target);
  return a;
}

// A linear module of the block with its LoRA path: y = x·Wᵀ (+ s·B·A·dropout(x)). The one place LoRA
// is applied in the forward.
void project(Backend& be, Tensor y, Tensor x, const LinearView& w, const LoraApply& lora, const LoraScratch& scratch) {
  be.linear_forward(y, x, w, 0.f);
  if (!lora.segments.empty() || lora.row_slot) be.lora_forward(y, x, lora, scratch);
}

}  // namespace

// ------------------------------------------------------------------------------------------ training

int64_t TrainBatch::count_targets() const {
  int64_t n = 0;
  for (int b = 0; b < B; b++)
    for (int t = 1; t < T; t++) {
      const size_t i = (size_t)b * T + t;
      n += labels[i] != -100 && (doc_start.empty() || doc_start[i] != t);
    }
  return n;
}

namespace {

// Activations of one layer's forward that its backward needs.
struct LayerActs {
  Tensor xn1;               // (M,H)
  float* rstd1;             // (M)
  Tensor q, k, v;           // (M,NH*D), (M,NKV*D) x2, rotated q/k
  Tensor att;               // (M,NH*D)
  float* lse;               // (B,NH,T)
  Tensor x2;                // (M,H) residual after attention
  Tensor xn2;               // (M,H)
  float* rstd2;             // (M)
  Tensor g, u;              // (M,I) gate, up; their gradients overwrite them in the backward
  Tensor h;                 // (M,I) silu(gate)*up; the storage of dh when down_proj has no LoRA
};

// Scratch of the backward, shared by all layers. The MLP part runs first; the attention part's
// buffers then reuse its memory (and, with recompute, that of the MLP's activations).
struct LayerGrads {
  Tensor dh;            // (M,I)
  Tensor dxn_mlp;       // (M,H) in dh's memory when it fits
  Tensor datt, dq;      // (M,NH*D)
  Tensor dk, dv;        // (M,NKV*D)
  Tensor dxn_attn;      // (M,H)
};

// Everything a training pass uses, carved in one order (the plan measures exactly this).
struct TrainWorkspace {
  int32_t *ids, *pos, *scored_rows, *scored_targets;  // (M) each
  int32_t* doc_start;                                // (M): packed batches only
  double* loss_sum;
  std::vector<Tensor> layer_in;   // (L+1) x (M,H): the input of each layer, and the final stream
  std::vector<LayerActs> acts;    // L when every layer's activations are kept, else 1 (recompute)
  Tensor dx;                      // (M,H) the gradient of the residual stream
  LayerGrads grads;
  LoraScratch lora;
  // The head (final norm, lm_head, cross-entropy) runs between the last layer's forward and the first
  // layer's backward, so its buffers lie over the layers' working memory.
  Tensor xnf;                     // (M,H)
  float* rstdf;                   // (M)
  Tensor logits;                  // (chunk,V) float32
  Tensor xs, dxs;                 // (chunk,H)
  Tensor dxnf;                    // (M,H)
  TrainWorkspaceParts parts;
};

// The attention half of a layer's activations.
void carve_attention_acts(Arena& a, LayerActs& x, const LlamaConfig& c, DType act, int B, int T) {
  const int64_t M = (int64_t)B * T;
  x.xn1 = a.take(M, c.H, act);
  x.rstd1 = a.take_array<float>(M);
  x.q = a.take(M, c.NH * c.D, act);
  x.k = a.take(M, c.NKV * c.D, act);
  x.v = a.take(M, c.NKV * c.D, act);
  x.att = a.take(M, c.NH * c.D, act);
  x.lse = a.take_array<float>((int64_t)B * c.NH * T);
}

// The MLP half; h only when it has its own storage.
void carve_mlp_acts(Arena& a, LayerActs& x, const LlamaConfig& c, DType act, int64_t M, bool own_h) {
  x.x2 = a.take(M, c.H, act);
  x.xn2 = a.take(M, c.H, act);
  x.rstd2 = a.take_array<float>(M);
  x.g = a.take(M, c.I, act);
  x.u = a.take(M, c.I, act);
  if (own_h) x.h = a.take(M, c.I, act);
}

TrainWorkspace carve_train(Arena& a, const LlamaConfig& c, DType act, int B, int T, const LoraSpec& lora,
                           const TrainPassOptions& opt) {
  const int64_t M = (int64_t)B * T, QD = c.NH * c.D, KVD = c.NKV * c.D;
  const int64_t chunk = std::min<int64_t>(std::max(1, opt.ce_chunk_rows), M);
  const bool keep_all = opt.backward && !opt.recompute;
  // h is read again only by down_proj's LoRA backward; otherwise dh takes its memory.
  const bool own_h = !opt.backward || (lora.r > 0 && ((lora.target_mask >> DOWN) & 1u));
  TrainWorkspace w;
  TrainWorkspaceParts& parts = w.parts;
  const size_t begin = a.used();

  w.ids = a.take_array<int32_t>(M);
  w.pos = a.take_array<int32_t>(M);
  w.doc_start = a.take_array<int32_t>(M);
  w.scored_rows = a.take_array<int32_t>(M);
  w.scored_targets = a.take_array<int32_t>(M);
  w.loss_sum = a.take_array<double>(1);
  const size_t inputs_end = a.used();

  for (int l = 0; l <= c.L; l++) w.layer_in.push_back(a.take(M, c.H, act));
  w.acts.resize(keep_all ? c.L : 1);
  if (keep_all)
    for (LayerActs& x : w.acts) {
      carve_attention_acts(a, x, c, act, B, T);
      carve_mlp_acts(a, x, c, act, M, own_h);
    }
  const size_t saved_end = a.used();

  // The layers' working memory: the stream's gradient, then what one layer's pass uses.
  if (opt.backward) w.dx = a.take(M, c.H, act);
  const size_t region = a.used();
  if (lora.r > 0) {
    // LoRA's input-width scratch is as wide as the widest adapted module's input.
    int64_t max_in = 0;
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!((lora.target_mask >> t) & 1u)) continue;
      int out = 0, in = 0;
      target_shape(c, t, &out, &in);
      max_in = std::max<int64_t>(max_in, in);
    }
    w.lora.u = a.take(M, lora.r, DType::F32);
    if (opt.dropout.p > 0.f) w.lora.xd = a.take(M, max_in, DType::F32);
    if (opt.backward) {
      w.lora.du = a.take(M, lora.r, DType::F32);
      w.lora.dxd = a.take(M, max_in, DType::F32);
    }
  }
  LayerActs& x = w.acts[0];
  if (!keep_all) carve_attention_acts(a, x, c, act, B, T);
  const size_t mlp_begin = a.used();
  if (!keep_all) carve_mlp_acts(a, x, c, act, M, own_h);
  if (opt.backward) {
    // MLP part, then the attention part over the same memory.
    w.grads.dh = a.take(M, c.I, act);
    // dh is dead once SwiGLU's backward has read it, before dxn_mlp is first written.
    w.grads.dxn_mlp = c.H <= c.I ? make_tensor(w.grads.dh.data, act, M, c.H, a.device()) : a.take(M, c.H, act);
    const size_t mlp_end = a.used();
    a.seek(mlp_begin);
    w.grads.datt = a.take(M, QD, act);
    w.grads.dq = a.take(M, QD, act);
    w.grads.dk = a.take(M, KVD, act);
    w.grads.dv = a.take(M, KVD, act);
    w.grads.dxn_attn = a.take(M, c.H, act);
    a.seek(std::max(mlp_end, a.used()));
    if (!own_h)
      for (LayerActs& y : w.acts) y.h = w.grads.dh;
  }
  const size_t region_end = a.used();

  a.seek(region);
  w.xnf = a.take(M, c.H, act);
  w.rstdf = a.take_array<float>(M);
  w.logits = a.take(chunk, c.V, DType::F32);
  w.xs = a.take(chunk, c.H, act);
  if (opt.backward) {
    w.dxs = a.take(chunk, c.H, act);
    w.dxnf = a.take(M, c.H, act);
  }
  const size_t head_end = a.used();
  a.seek(std::max(region_end, head_end));

  parts.inputs = inputs_end - begin;
  parts.saved_activations = saved_end - inputs_end;
  parts.layer_working_set = region_end - saved_end;
  parts.head = head_end - region;
  parts.head_shared = std::min(head_end, region_end) - region;
  parts.total = a.used() - begin;
  return w;
}

struct TrainContext {
  LlamaModel& m;
  Backend& be;
  const LlamaConfig& c;
  AttentionShape shape;
  int64_t M;
  const int32_t* pos;
  const AdapterTensors* adapter;   // the adapter of the forward (null: base)
  bool backward_adapter;           // its gradients are wanted
  const DropoutContext& drop;
  const LoraScratch& lora;
  // Whether the training adapter has a LoRA on (layer, target).
  bool adapted(int l, int t) const { return backward_adapter && adapter->mod(l, t).view.A; }
};

// The LoRA scratch narrowed to a module's input width.
LoraScratch lora_scratch_for(const LoraScratch& s, int in) {
  LoraScratch n = s;
  if (s.xd.data || s.xd.rows) n.xd = make_tensor(s.xd.data, DType::F32, s.xd.rows, in, s.xd.device);
  if (s.dxd.data || s.dxd.rows) n.dxd = make_tensor(s.dxd.data, DType::F32, s.dxd.rows, in, s.dxd.device);
  return n;
}

void train_project(TrainContext& tc, Tensor y, Tensor x, int l, int t) {
  const LinearView& w = tc.m.w.layers[l].lin[t];
  project(tc.be, y, x, w, training_lora(tc.adapter, tc.M, l, t, tc.drop), lora_scratch_for(tc.lora, w.in));
}

// dx (+)= dy·W and LoRA gradients of the module (only when the adapter trains).
void project_backward(TrainContext& tc, Tensor dx, bool accumulate, Tensor dy, Tensor x, int l, int t) {
  const LinearView& w = tc.m.w.layers[l].lin[t];
  tc.be.linear_backward_input(dx, dy, w, accumulate ? 1.f : 0.f);
  if (!tc.backward_adapter) return;
  const AdapterTensors::Module& mod = tc.adapter->mod(l, t);
  if (!mod.view.A) return;
  tc.be.lora_backward(dx, mod.dA, mod.dB, dy, x, mod.view, tc.drop.at(l, t), lora_scratch_for(tc.lora, w.in));
}

// x_out[M,H] = block(x_in). Without x_out (the recompute before a layer's backward) it stops once the
// activations the backward reads exist: the block's output is not needed again, nor h unless
// down_proj's LoRA reads it.
void layer_forward(TrainContext& tc, int l, const LayerActs& a, Tensor x_in, const Tensor* x_out) {
  const LlamaConfig& c = tc.c;
  Backend& be = tc.be;
  const BackendWeights::Layer& lw = tc.m.w.layers[l];
  be.rmsnorm_forward(a.xn1, a.rstd1, x_in, lw.attn_norm, c.rms_eps);
  train_project(tc, a.q, a.xn1, l, Q);
  train_project(tc, a.k, a.xn1, l, K);
  train_project(tc, a.v, a.xn1, l, V_PROJ);
  be.rope(a.q, tc.pos, tc.m.rope, c.NH, false);
  be.rope(a.k, tc.pos, tc.m.rope, c.NKV, false);
  be.attention_forward(a.att, a.lse, a.q, a.k, a.v, tc.shape);
  train_project(tc, a.x2, a.att, l, O);
  be.add(a.x2, x_in);
  be.rmsnorm_forward(a.xn2, a.rstd2, a.x2, lw.mlp_norm, c.rms_eps);
  train_project(tc, a.g, a.xn2, l, GATE);
  train_project(tc, a.u, a.xn2, l, UP);
  if (!x_out && !tc.adapted(l, DOWN)) return;
  be.swiglu_forward(a.h, a.g, a.u);
  if (!x_out) return;
  train_project(tc, *x_out, a.h, l, DOWN);
  be.add(*x_out, a.x2);
}

// On entry dx[M,H] = dL/d(x_out); on exit dx = dL/d(x_in).
void layer_backward(TrainContext& tc, int l, const LayerActs& a, Tensor x_in, Tensor dx, const LayerGrads& g) {
  const LlamaConfig& c = tc.c;
  Backend& be = tc.be;
  const BackendWeights::Layer& lw = tc.m.w.layers[l];
  // MLP: x_out = x2 + down(silu(gate(xn2)) * up(xn2))
  project_backward(tc, g.dh, false, dx, a.h, l, DOWN);
  const Tensor dg = a.g, du = a.u;  // in place: gate and up are not read again
  be.swiglu_backward(dg, du, g.dh, a.g, a.u);
  project_backward(tc, g.dxn_mlp, false, dg, a.xn2, l, GATE);
  project_backward(tc, g.dxn_mlp, true, du, a.xn2, l, UP);
  be.rmsnorm_backward(dx, g.dxn_mlp, a.x2, lw.mlp_norm, a.rstd2, true);  // dx = dL/dx2
  // Attention: x2 = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))). From here on the MLP's buffers
  // are dead; the attention part's gradients lie over them.
  project_backward(tc, g.datt, false, dx, a.att, l, O);
  be.attention_backward(g.dq, g.dk, g.dv, g.datt, a.att, a.lse, a.q, a.k, a.v, tc.shape);
  be.rope(g.dq, tc.pos, tc.m.rope, c.NH, true);
  be.rope(g.dk, tc.pos, tc.m.rope, c.NKV, true);
  project_backward(tc, g.dxn_attn, false, g.dq, a.xn1, l, Q);
  project_backward(tc, g.dxn_attn, true, g.dk, a.xn1, l, K);
  project_backward(tc, g.dxn_attn, true, g.dv, a.xn1, l, V_PROJ);
  be.rmsnorm_backward(dx, g.dxn_attn, x_in, lw.attn_norm, a.rstd1, true);  // dx = dL/dx_in
}

// A packed row is documents one after another: doc_start[t] is 0 at t = 0, and either t (a new
// document) or doc_start[t - 1] (the same one) after.
void check_doc_starts(const TrainBatch& batch) {
  require((int64_t)batch.doc_start.size() == (int64_t)batch.B * batch.T, "INVALID_ARGUMENT",
          "train batch doc_start must have B*T entries");
  for (int b = 0; b < batch.B; b++)
    for (int t = 0; t < batch.T; t++) {
      const int32_t s = batch.doc_start[(size_t)b * batch.T + t];
      const bool ok = t == 0 ? s == 0 : s == t || s == batch.doc_start[(size_t)b * batch.T + t - 1];
      require(ok, "INVALID_ARGUMENT",
              "train batch doc_start[" + std::to_string(b) + "][" + std::to_string(t) + "] = " + std::to_string(s) +
                  " does not start a document there nor continue the previous one");
    }
}

void check_ids(const int32_t* ids, int64_t n, int V) {
  for (int64_t m = 0; m < n; m++)
    require(ids[m] >= 0 && ids[m] < V, "INVALID_ARGUMENT",
            "token id " + std::to_string(ids[m]) + " is outside the vocabulary [0, " + std::to_string(V) + ")");
}

// The rank (the largest of its modules) and targets of an adapter, which size the LoRA scratch.
LoraSpec shape_of(const AdapterTensors* a) {
  LoraSpec s;
  s.r = 0;
  if (a)
    for (const auto& layer : a->mods)
      for (int t = 0; t < NUM_TARGETS; t++)
        if (layer[t].view.A) {
          s.r = std::max(s.r, layer[t].view.r);
          s.target_mask |= 1u << t;
        }
  return s;
}

}  // namespace

TrainWorkspaceParts plan_train_parts(const LlamaConfig& c, DType act, int B, int T, const LoraSpec& lora,
                                     const TrainPassOptions& opt) {
  Arena a = Arena::measuring(DeviceKind::CPU);
  return carve_train(a, c, act, B, T, lora, opt).parts;
}

size_t plan_train_workspace(const LlamaModel& m, int B, int T, const LoraSpec& lora, const TrainPassOptions& opt) {
  return plan_train_parts(m.cfg(), m.be->compute_dtype(), B, T, lora, opt).total;
}

double llama_train_pass(LlamaModel& m, const AdapterTensors* adapter, const TrainBatch& batch,
                        const TrainPassOptions& opt, Arena& ws) {
  const LlamaConfig& c = m.cfg();
  Backend& be = *m.be;
  const int B = batch.B, T = batch.T;
  const int64_t M = (int64_t)B * T;
  require(B > 0 && T > 0 && (int64_t)batch.ids.size() == M && (int64_t)batch.labels.size() == M, "INVALID_ARGUMENT",
          "train batch shape does not match its ids/labels");
  check_ids(batch.ids.data(), M, c.V);
  m.ensure_rope(T);
  ws.reset();
  TrainWorkspace w = carve_train(ws, c, be.compute_dtype(), B, T, shape_of(adapter), opt);

  // Host inputs: positions, and the rows that have a target. Position t predicts labels[t + 1] (the
  // shift Hugging Face applies inside the loss); prompt and padding rows are skipped: their logits are
  // never computed. A packed batch restarts positions at every document and never scores a document's
  // last row against the next document's first token.
  const bool packed = !batch.doc_start.empty();
  if (packed) check_doc_starts(batch);
  std::vector<int32_t> pos(M), scored_rows, scored_targets;
  for (int64_t i = 0; i < M; i++) pos[i] = (int32_t)(i % T) - (packed ? batch.doc_start[i] : 0);
  for (int b = 0; b < B; b++)
    for (int t = 0; t + 1 < T; t++) {
      const int64_t next = (int64_t)b * T + t + 1;
      const int32_t y = batch.labels[next];
      if (y == -100 || (packed && batch.doc_start[next] == t + 1)) continue;
      scored_rows.push_back(b * T + t);
      scored_targets.push_back(y);
    }
  const int64_t n_scored = (int64_t)scored_rows.size();
  be.upload(w.ids, batch.ids.data(), M * sizeof(int32_t));
  be.upload(w.pos, pos.data(), M * sizeof(int32_t));
  if (packed) be.upload(w.doc_start, batch.doc_start.data(), M * sizeof(int32_t));
  be.upload(w.scored_rows, scored_rows.data(), n_scored * sizeof(int32_t));
  be.upload(w.scored_targets, scored_targets.data(), n_scored * sizeof(int32_t));
  be.fill_zero(w.loss_sum, sizeof(double));

  const bool backward_adapter = opt.backward && adapter != nullptr;
  const AttentionShape shape{B, T, c.NH, c.NKV, c.D, packed ? w.doc_start : nullptr};
  TrainContext tc{m, be, c, shape, M, w.pos, adapter, backward_adapter, opt.dropout, w.lora};

  // Forward. layer_in[l] holds the input of layer l (and layer_in[L] the final residual stream).
  be.embedding(w.layer_in[0], w.ids, m.w.embed);
  const bool keep_all = opt.backward && !opt.recompute;
  for (int l = 0; l < c.L; l++) layer_forward(tc, l, w.acts[keep_all ? l : 0], w.layer_in[l], &w.layer_in[l + 1]);
  be.rmsnorm_forward(w.xnf, w.rstdf, w.layer_in[c.L], m.w.final_norm, c.rms_eps);

  // Chunked cross-entropy over the scored rows: at most `chunk` rows of (V) logits exist at a time.
  const int64_t chunk = w.logits.rows;
  if (opt.backward) be.fill_zero(w.dxnf.data, size_t(M * c.H) * dtype_size(w.dxnf.dtype));
  for (int64_t r0 = 0; r0 < n_scored; r0 += chunk) {
    const int64_t rows = std::min<int64_t>(chunk, n_scored - r0);
    Tensor xs = w.xs.rows_view(0, rows), logits = w.logits.rows_view(0, rows);
    be.gather_rows(xs, w.xnf, w.scored_rows + r0);
    be.linear_forward(logits, xs, m.w.lm_head, 0.f);
    be.cross_entropy(w.loss_sum, logits, w.scored_targets + r0, opt.backward ? opt.loss_scale : 0.f);
    if (!opt.backward) continue;
    Tensor dxs = w.dxs.rows_view(0, rows);
    be.linear_backward_input(dxs, logits, m.w.lm_head, 0.f);
    be.scatter_rows(w.dxnf, dxs, w.scored_rows + r0);
  }
  double loss = 0;
  if (opt.backward) {
    // Backward, last layer first; with recompute each layer's forward is run again from its saved input.
    be.rmsnorm_backward(w.dx, w.dxnf, w.layer_in[c.L], m.w.final_norm, w.rstdf, false);
    for (int l = c.L - 1; l >= 0; l--) {
      const LayerActs& a = w.acts[keep_all ? l : 0];
      if (!keep_all) layer_forward(tc, l, a, w.layer_in[l], nullptr);
      layer_backward(tc, l, a, w.layer_in[l], w.dx, w.grads);
    }
  }
  be.download(&loss, w.loss_sum, sizeof(double));
  return loss;
}

// ----------------------------------------------------------------------------------------- inference

InferenceWorkspace carve_inference(Arena& a, const LlamaConfig& c, DType act, int64_t M, int64_t S, int max_blocks,
                                   int64_t n_logits, int max_rank) {
  const int64_t QD = c.NH * c.D, KVD = c.NKV * c.D;
  InferenceWorkspace w;
  w.M = M;
  w.S = S;
  w.n_logits = n_logits;
  w.max_blocks = max_blocks;
  w.max_rank = max_rank;
  w.x = a.take(M, c.H, act);
  w.xn = a.take(M, c.H, act);
  w.q = a.take(M, QD, act);
  w.k = a.take(M, KVD, act);
  w.v = a.take(M, KVD, act);
  w.att = a.take(M, QD, act);
  w.tmp = a.take(M, c.H, act);
  w.g = a.take(M, c.I, act);
  w.u = a.take(M, c.I, act);
  w.lora_u = a.take(M, std::max(1, max_rank), DType::F32);
  w.ids = a.take_array<int32_t>(M);
  w.pos = a.take_array<int32_t>(M);
  w.slot = a.take_array<int32_t>(M);
  w.row_seq = a.take_array<int32_t>(M);
  w.len = a.take_array<int32_t>(M);
  w.tables = a.take_array<int32_t>(std::max<int64_t>(1, S * max_blocks));
  w.row_slot = a.take_array<int32_t>(M);
  w.logit_index = a.take_array<int32_t>(std::max<int64_t>(1, n_logits));
  w.xl = a.take(n_logits, c.H, act);
  w.xnl = a.take(n_logits, c.H, act);
  w.logits = a.take(n_logits, c.V, DType::F32);
  return w;
}

size_t plan_inference_workspace(const LlamaConfig& c, DType act, int64_t M, int64_t S, int max_blocks, int64_t n_logits,
                                int max_rank) {
  Arena a = Arena::measuring(DeviceKind::CPU);
  carve_inference(a, c, act, M, S, max_blocks, n_logits, max_rank);
  return a.used();
}

void stage_inference(LlamaModel& m, const InferenceBatch& b, const InferenceWorkspace& ws, const KVPool& kv) {
  const LlamaConfig& c = m.cfg();
  Backend& be = *m.be;
  const int64_t M = b.rows(), S = b.sequences(), n = (int64_t)b.logit_rows.size();
  require(M <= ws.M && S <= ws.S && n <= ws.n_logits && b.max_blocks == ws.max_blocks, "INTERNAL",
          "inference step larger than its workspace");
  check_ids(b.tokens.data(), M, c.V);
  const int bs = kv.block_size();
  // Padding rows (M..ws.M) write into the reserved scratch block 0 and attend to its first position.
  std::vector<int32_t> tokens(ws.M, 0), pos(ws.M, 0), slot(ws.M, 0), row_seq(ws.M, 0), len(ws.M, 1),
      row_slot(ws.M, -1);
  std::vector<int32_t> tables(std::max<int64_t>(1, ws.S * ws.max_blocks), 0);
  std::copy(b.block_tables.begin(), b.block_tables.end(), tables.begin());
  int32_t max_pos = 0;
  for (int64_t i = 0; i < M; i++) {
    const int32_t p = b.pos[i], s = b.row_seq[i];
    require(s >= 0 && s < S && p >= 0 && p / bs < b.max_blocks, "INTERNAL", "inference row outside its block table");
    const int32_t block = b.block_tables[(int64_t)s * b.max_blocks + p / bs];
    require(block > 0 && block < kv.num_blocks(), "INTERNAL", "inference row maps to no cache block");
    tokens[i] = b.tokens[i];
    pos[i] = p;
    slot[i] = block * bs + p % bs;
    row_seq[i] = s;
    len[i] = p + 1;
    max_pos = std::max(max_pos, p);
  }
  for (const AdapterRows& r : b.adapters)
    for (int64_t i = r.row_begin; i < r.row_end; i++) row_slot[i] = r.slot;
  std::vector<int32_t> logit_index(std::max<int64_t>(1, ws.n_logits), 0);
  std::copy(b.logit_rows.begin(), b.logit_rows.end(), logit_index.begin());
  m.ensure_rope(max_pos + 1);
  be.upload(ws.ids, tokens.data(), ws.M * sizeof(int32_t));
  be.upload(ws.pos, pos.data(), ws.M * sizeof(int32_t));
  be.upload(ws.slot, slot.data(), ws.M * sizeof(int32_t));
  be.upload(ws.row_seq, row_seq.data(), ws.M * sizeof(int32_t));
  be.upload(ws.len, len.data(), ws.M * sizeof(int32_t));
  be.upload(ws.tables, tables.data(), tables.size() * sizeof(int32_t));
  be.upload(ws.row_slot, row_slot.data(), ws.M * sizeof(int32_t));
  be.upload(ws.logit_index, logit_index.data(), logit_index.size() * sizeof(int32_t));
}

void run_inference(LlamaModel& m, const InferenceBatch& b, const InferenceWorkspace& ws, const KVPool& kv) {
  const LlamaConfig& c = m.cfg();
  Backend& be = *m.be;
  const PagedRows paged{ws.slot, ws.row_seq, ws.tables, ws.len, ws.max_blocks};
  LoraScratch scratch;
  scratch.u = ws.lora_u;
  // The LoRA of one (layer, target): host segments (the CPU form) and the per-row slot form.
  auto lora_of = [&](int l, int t) {
    LoraApply a;
    a.max_rank = ws.max_rank;
    for (const AdapterRows& r : b.adapters) {
      if (!r.adapter) continue;
      const LoraModuleView& mv = r.adapter->mod(l, t).view;
      if (mv.A) a.segments.push_back({r.row_begin, r.row_end, mv});
    }
    if (b.slot_modules && b.slots > 0) {
      a.row_slot = ws.row_slot;
      a.slot_modules = b.slot_modules + ((int64_t)l * NUM_TARGETS + t) * b.slots;
    }
    return a;
  };
  be.embedding(ws.x, ws.ids, m.w.embed);
  for (int l = 0; l < c.L; l++) {
    const BackendWeights::Layer& lw = m.w.layers[l];
    const KVLayerView cache = kv.layer(l);
    be.rmsnorm_forward(ws.xn, nullptr, ws.x, lw.attn_norm, c.rms_eps);
    project(be, ws.q, ws.xn, lw.lin[Q], lora_of(l, Q), scratch);
    project(be, ws.k, ws.xn, lw.lin[K], lora_of(l, K), scratch);
    project(be, ws.v, ws.xn, lw.lin[V_PROJ], lora_of(l, V_PROJ), scratch);
    be.rope(ws.q, ws.pos, m.rope, c.NH, false);
    be.rope(ws.k, ws.pos, m.rope, c.NKV, false);
    be.kv_write(cache, ws.k, ws.v, ws.slot);
    be.attention_paged(ws.att, ws.q, cache, paged, c.NH, c.NKV, c.D);
    project(be, ws.tmp, ws.att, lw.lin[O], lora_of(l, O), scratch);
    be.add(ws.x, ws.tmp);
    be.rmsnorm_forward(ws.xn, nullptr, ws.x, lw.mlp_norm, c.rms_eps);
    project(be, ws.g, ws.xn, lw.lin[GATE], lora_of(l, GATE), scratch);
    project(be, ws.u, ws.xn, lw.lin[UP], lora_of(l, UP), scratch);
    be.swiglu_forward(ws.g, ws.g, ws.u);
    project(be, ws.tmp, ws.g, lw.lin[DOWN], lora_of(l, DOWN), scratch);
    be.add(ws.x, ws.tmp);
  }
  if (ws.n_logits == 0) return;
  be.gather_rows(ws.xl, ws.x, ws.logit_index);
  be.rmsnorm_forward(ws.xnl, nullptr, ws.xl, m.w.final_norm, c.rms_eps);
  be.linear_forward(ws.logits, ws.xnl, m.w.lm_head, 0.f);
}

}  // namespace ts
