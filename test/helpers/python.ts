// Finds the Python that runs the PyTorch reference (Debian's python3-torch at /usr/bin/python3).
// The `python3` on PATH may be another interpreter without torch, so the path is fixed.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";

export const REFERENCE_PYTHON = "/usr/bin/python3";

let cached: string | null | undefined;

/**
 * The interpreter path when it imports torch, else null (callers skip loudly). Checked once. In CI
 * (CI set, as .ci/run does) a missing reference is an error: the parity tests must not skip there.
 */
export function referencePython(): string | null {
  if (cached !== undefined) return cached;
  cached = null;
  if (existsSync(REFERENCE_PYTHON)) {
    const probe = spawnSync(REFERENCE_PYTHON, ["-c", "import torch, numpy"], { encoding: "utf8", timeout: 60_000 });
    if (probe.status === 0) cached = REFERENCE_PYTHON;
  }
  if (cached === null && process.env.CI) throw new Error(`CI needs PyTorch at ${REFERENCE_PYTHON} for the parity tests (apt-get install -y python3-torch libopenblas0-pthread)`);
  return cached;
}
