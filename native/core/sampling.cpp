// SamplerRng (sampling.h): xoshiro256** seeded through splitmix64.
#include "core/sampling.h"

#include "core/counter_rng.h"

namespace ts {

namespace {
inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

SamplerRng::SamplerRng(uint64_t seed) {
  // splitmix64 as a generator: the i-th word is the hash of seed + i·golden.
  uint64_t x = seed;
  for (auto& word : s) {
    word = splitmix64_hash(x);
    x += 0x9e3779b97f4a7c15ull;
  }
}

uint64_t SamplerRng::next() {
  const uint64_t result = rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double SamplerRng::uniform() { return double(next() >> 11) * 0x1.0p-53; }

}  // namespace ts
