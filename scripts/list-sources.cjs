// Lists the native sources binding.gyp compiles: every .cpp (or, with "cu", every .cu) under the
// given native/ folders, sorted, so adding a file needs no build-file edit.
const fs = require('node:fs');
const path = require('node:path');
const ext = process.argv[2] === 'cu' ? '.cu' : '.cpp';
const dirs = process.argv[2] === 'cu' ? ['native/cuda'] : ['native/core', 'native/cpu', 'native/cuda', 'native/model', 'native/addon'];
const files = [];
for (const d of dirs) {
  if (!fs.existsSync(d)) continue;
  for (const f of fs.readdirSync(d).sort()) if (f.endsWith(ext)) files.push(path.posix.join(d, f));
}
process.stdout.write(files.join('\n'));
