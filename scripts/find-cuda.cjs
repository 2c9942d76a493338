// Prints the CUDA toolkit root when nvcc is usable here, else nothing. binding.gyp asks this to
// decide whether the CUDA sources are compiled; the addon must build and run without them.
const { execSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

function root() {
  if (process.env.TUNESERVE_NO_CUDA === '1') return '';
  for (const v of [process.env.CUDA_HOME, process.env.CUDA_PATH]) {
    if (v && fs.existsSync(path.join(v, 'bin', 'nvcc'))) return v;
  }
  try {
    // nvcc may be a wrapper script; its dry run names the real toolkit folder.
    const out = execSync('nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1', { encoding: 'utf8' });
    const m = out.match(/TOP=(\S+)/);
    if (m) return path.resolve(m[1]);
  } catch { /* no nvcc */ }
  return '';
}

const r = root();
const mode = process.argv[2];
if (mode === 'has') process.stdout.write(r && fs.existsSync(path.join(r, 'lib64', 'libcudart_static.a')) ? '1' : '0');
else process.stdout.write(r);
