#!/usr/bin/env node
// The `tuneserve` command: runs the compiled CLI (dist/, built by `npm run build` / `npm ci`).
import { main } from '../dist/cli/main.js';

process.exitCode = await main(process.argv.slice(2));
