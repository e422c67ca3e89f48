// Builds provider.js into a WebAssembly component of the `provider` world of
// wit/provider.wit: node build.mjs [OUTPUT.wasm] (default static-table.wasm).
//
// The `jco componentize` command fails on some machines ("failed to get path metadata"),
// so this calls componentize-js directly.
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { componentize } from '@bytecodealliance/componentize-js';

const here = (path) => fileURLToPath(new URL(path, import.meta.url));
const output = process.argv[2] ?? here('static-table.wasm');

const { component } = await componentize({
  sourcePath: here('provider.js'),
  witPath: here('../../../wit'),
  worldName: 'provider',
  // No wasi:http, no fetch: the host grants neither to this provider.
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile(output, component);
