// The PyTorch reference checks itself: hand-computed RoPE values, float64 finite-difference LoRA
// gradients (fd_check.py) and self-consistency of its command-line tasks (self_check.py). The parity
// tests trust this reference, so it must pass here first.
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";
import { referencePython } from "./helpers/python.js";

const run = promisify(execFile);
const python = referencePython();
const script = (name: string): string => fileURLToPath(new URL(`./reference/${name}`, import.meta.url));

if (!python) {
  console.warn(
    [
      "",
      "!!! SKIPPING the PyTorch reference self-checks: /usr/bin/python3 cannot import torch.",
      "!!! Install Debian's python3-torch (apt-get install -y python3-torch libopenblas0-pthread)",
      "!!! or run `npm test` as root, which installs it (scripts/ensure-reference.mjs).",
      "",
    ].join("\n"),
  );
}

async function runScript(name: string): Promise<string> {
  try {
    const { stdout } = await run(python as string, [script(name)], { timeout: 300_000, maxBuffer: 16 << 20 });
    return stdout;
  } catch (error) {
    const failed = error as { stdout?: string; stderr?: string; message: string };
    throw new Error(`${name} failed:\n${failed.stdout ?? ""}\n${failed.stderr ?? failed.message}`);
  }
}

describe.skipIf(!python)("PyTorch reference (test/reference/llama_ref.py)", () => {
  // Tolerances live in the scripts (1e-7 + 1e-5·|g| for float64 central differences; 1e-10 for
  // float64 self-consistency); here we only require their PASS lines.
  it("matches hand-computed llama3 RoPE values and finite-difference LoRA gradients", async () => {
    const stdout = await runScript("fd_check.py");
    expect(stdout).toMatch(/^fd_check: PASS/m);
  }, 300_000);

  it("is self-consistent across its logits, loss_grads and train tasks", async () => {
    const stdout = await runScript("self_check.py");
    expect(stdout).toMatch(/^self_check: PASS/m);
  }, 300_000);
});
