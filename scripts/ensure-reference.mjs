// Run by `npm test` before vitest: makes sure the PyTorch reference of the parity tests can run
// (Debian's python3-torch at /usr/bin/python3 plus OpenBLAS), installing it with apt when we are root.
// It never fails the test run: when the reference cannot be had it warns loudly and exits 0, and the
// parity tests skip themselves (test/helpers/python.ts).
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, realpathSync } from "node:fs";
import { join } from "node:path";

const PYTHON = "/usr/bin/python3";
const PACKAGES = ["python3-torch", "libopenblas0-pthread"];
const APT_GET = "/usr/bin/apt-get";

/** Cheap: asks Python to find (not import) torch and numpy; ~30 ms instead of ~2 s for an import. */
function torchPresent() {
  if (!existsSync(PYTHON)) return false;
  const probe = spawnSync(
    PYTHON,
    ["-c", "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') and u.find_spec('numpy') else 1)"],
    { timeout: 20_000 },
  );
  return probe.status === 0;
}

/** The multiarch library folders (/usr/lib/x86_64-linux-gnu and the like). */
function libraryFolders() {
  try {
    return readdirSync("/usr/lib")
      .filter((name) => name.endsWith("-linux-gnu"))
      .map((name) => join("/usr/lib", name));
  } catch {
    return [];
  }
}

/** libopenblas0-pthread installs <multiarch>/openblas-pthread/libopenblas*.so*. */
function openblasPresent() {
  return libraryFolders().some((folder) => {
    try {
      return readdirSync(join(folder, "openblas-pthread")).some((name) => name.startsWith("libopenblas"));
    } catch {
      return false;
    }
  });
}

/** torch links libblas.so.3; Debian's alternatives decide which BLAS that is. Null when unknown. */
function blasProvider() {
  for (const folder of libraryFolders()) {
    const link = join(folder, "libblas.so.3");
    if (existsSync(link)) return realpathSync(link);
  }
  return null;
}

function loudWarning(lines) {
  const bar = "!".repeat(100);
  console.error(["", bar, ...lines.map((line) => `!!! ${line}`), bar, ""].join("\n"));
}

function skippedWarning(reason) {
  loudWarning([
    "THE PYTORCH PARITY TESTS WILL BE SKIPPED.",
    reason,
    `They need Debian's ${PACKAGES.join(" and ")} (torch at ${PYTHON}). To install them:`,
    `    sudo apt-get update && sudo apt-get install -y ${PACKAGES.join(" ")}`,
    "then run the tests again. Everything else still runs.",
  ]);
}

function run(command, args, timeoutMs) {
  const result = spawnSync(command, args, {
    stdio: ["ignore", "inherit", "inherit"],
    timeout: timeoutMs,
    env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
  });
  return result.status === 0;
}

function main() {
  if (torchPresent() && openblasPresent()) {
    const provider = blasProvider();
    if (provider && !provider.includes("openblas")) {
      loudWarning([
        `OpenBLAS is installed but libblas.so.3 resolves to ${provider}: torch will use the slow reference BLAS`,
        "and bench/torch_llama.py will refuse to report. Fix: update-alternatives --auto libblas.so.3-$(dpkg-architecture -qDEB_HOST_MULTIARCH)",
      ]);
    }
    return;
  }
  if (process.platform !== "linux") {
    skippedWarning(`This is ${process.platform}, not Debian/Ubuntu Linux.`);
    return;
  }
  if (process.env.TUNESERVE_NO_APT === "1") {
    skippedWarning("TUNESERVE_NO_APT=1 is set, so nothing is installed automatically.");
    return;
  }
  if (typeof process.getuid !== "function" || process.getuid() !== 0) {
    skippedWarning("Not running as root, so apt-get cannot install it here.");
    return;
  }
  if (!existsSync(APT_GET)) {
    skippedWarning(`${APT_GET} is not available.`);
    return;
  }
  console.log(`installing the PyTorch reference (about a minute): apt-get install ${PACKAGES.join(" ")}`);
  const installed =
    run(APT_GET, ["update", "-qq"], 300_000) && run(APT_GET, ["install", "-y", "-qq", ...PACKAGES], 900_000);
  if (!installed || !torchPresent() || !openblasPresent()) {
    skippedWarning("apt-get could not install it (no network or no such package?); see its output above.");
    return;
  }
  console.log("PyTorch reference installed.");
}

try {
  main();
} catch (error) {
  skippedWarning(`Checking for it failed: ${error instanceof Error ? error.message : String(error)}`);
}
process.exit(0);
