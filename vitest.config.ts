// Test runner settings. Native tests use every core through the engine's own thread pool, so test
// files run one at a time (parallel files would only fight over the same two cores in CI).
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 900_000,
    reporters: ['default'],
  },
});
