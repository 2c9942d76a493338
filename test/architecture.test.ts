// The layering of native/ (ARCHITECTURE.md, "The backend interface"): the model is written once against
// core/backend.h and includes no backend; core includes nothing above it; each backend includes core
// only (and its own folder). A grep over the #include lines, so a stray include fails CI at once.

import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const NATIVE = join(import.meta.dirname, '..', 'native');

/** Every `#include "dir/..."` of the files directly in native/<folder>, as [file, included folder]. */
function includes(folder: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (const name of readdirSync(join(NATIVE, folder))) {
    if (!/\.(h|cpp|cu|cuh)$/.test(name)) continue;
    const text = readFileSync(join(NATIVE, folder, name), 'utf8');
    for (const m of text.matchAll(/^\s*#\s*include\s+"([a-z_]+)\//gm)) out.push([`${folder}/${name}`, m[1]!]);
  }
  return out;
}

// Which folders each layer may include from (besides the standard library and third-party headers).
const ALLOWED: Record<string, string[]> = {
  core: ['core'],
  cpu: ['core', 'cpu'],
  cuda: ['core', 'cuda'],
  model: ['core', 'model'],
  addon: ['core', 'cpu', 'cuda', 'model', 'addon'],
};

describe('native/ layering', () => {
  for (const [folder, allowed] of Object.entries(ALLOWED)) {
    it(`native/${folder} includes only ${allowed.join(', ')}`, () => {
      const found = includes(folder);
      expect(found.length).toBeGreaterThan(0); // the folder exists and was read
      const wrong = found.filter(([, dir]) => !allowed.includes(dir)).map(([file, dir]) => `${file} includes ${dir}/`);
      expect(wrong).toEqual([]);
    });
  }
});
