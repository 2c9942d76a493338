// Seeded uniforms (mulberry32) for the load generator's arrivals and the random adapters it serves:
// the same seed gives the same stream, so a load run replays. The tests' fuzz helpers draw from it too.

/** A generator of uniform numbers in [0, 1) for `seed`. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
