// Llama 3 model hyperparameters, as read from a Hugging Face config.json by the TypeScript side
// (src/engine/model-folder.ts validates them; the engine trusts what it is given).
//
// Shape letters used across native/: B batch, T tokens per sequence, M rows (B*T, or the rows of an
// inference step), H hidden, I intermediate, V vocab, L layers, NH query heads, NKV kv heads,
// D head dim, r LoRA rank.
#pragma once
#include <cstdint>

namespace ts {

struct LlamaConfig {
  int H = 0;     // hidden_size
  int I = 0;     // intermediate_size
  int L = 0;     // num_hidden_layers
  int NH = 0;    // num_attention_heads
  int NKV = 0;   // num_key_value_heads
  int D = 0;     // head_dim
  int V = 0;     // vocab_size
  float rms_eps = 1e-5f;
  float rope_theta = 500000.f;
  bool rope_llama3 = false;         // rope_scaling {rope_type: "llama3"}
  float rope_factor = 8.f;
  float rope_low_freq_factor = 1.f;
  float rope_high_freq_factor = 4.f;
  int rope_original_max_pos = 8192;
  bool tied = false;                // tie_word_embeddings: lm_head shares embed_tokens
  int max_pos = 131072;             // max_position_embeddings
};

// The seven linear modules of a Llama block that LoRA can target, in PEFT's names.
enum Target : int { Q = 0, K, V_PROJ, O, GATE, UP, DOWN, NUM_TARGETS };
inline const char* target_name(int t) {
  static const char* names[NUM_TARGETS] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return names[t];
}
// [out, in] of each target's weight.
inline void target_shape(const LlamaConfig& c, int t, int* out, int* in) {
  switch (t) {
    case Q: *out = c.NH * c.D; *in = c.H; break;
    case K: case V_PROJ: *out = c.NKV * c.D; *in = c.H; break;
    case O: *out = c.H; *in = c.NH * c.D; break;
    case GATE: case UP: *out = c.I; *in = c.H; break;
    default: *out = c.H; *in = c.I; break;  // DOWN
  }
}

}  // namespace ts
