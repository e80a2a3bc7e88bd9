// Builds what the package ships besides src/ (run by `npm pack` through prepack):
//   src/messages.d.ts   the contracts' message types, generated from the .proto files
//   dist/types/         declarations of the ES module (src/*.js, from their JSDoc) + messages
//   dist/cjs/           the same code as CommonJS, with the same declarations, for require()
// The CommonJS build is a per-file transpile (TypeScript's transpileModule) of src/*.js; two
// things differ from ESM semantics and are fixed here: a default import of a CommonJS package
// is its module.exports (as Node's ESM loader gives it), and the package directory comes from
// __dirname (package-dir.js uses import.meta, which CommonJS lacks).
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import ts from 'typescript';

const NODE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SRC = path.join(NODE_DIR, 'src');
const DIST = path.join(NODE_DIR, 'dist');
const TYPES = path.join(DIST, 'types');
const CJS = path.join(DIST, 'cjs');

execFileSync(process.execPath, [path.join(NODE_DIR, 'scripts', 'gen-types.mjs')], { stdio: 'inherit' });
rmSync(DIST, { recursive: true, force: true });

// Declarations from the JSDoc; tsc does not copy the .d.ts it reads, so messages is copied.
execFileSync(process.execPath, [path.join(NODE_DIR, 'node_modules', 'typescript', 'bin', 'tsc'), '-p',
  path.join(NODE_DIR, 'tsconfig.build.json')], { stdio: 'inherit' });
copyFileSync(path.join(SRC, 'messages.d.ts'), path.join(TYPES, 'messages.d.ts'));
const indexTypes = path.join(TYPES, 'index.d.ts');
writeFileSync(indexTypes, `${readFileSync(indexTypes, 'utf8').trimEnd()}\n// Every message and enum of the contracts.\n`
  + "export type * from './messages.js';\n");

const DEFAULT_IMPORT_HELPER = 'return (mod && mod.__esModule) ? mod : { "default": mod };';
mkdirSync(CJS, { recursive: true });
for (const file of readdirSync(SRC).filter((f) => f.endsWith('.js'))) {
  let code;
  if (file === 'package-dir.js') {
    code = "'use strict';\n// The CommonJS build's package-dir.js (see scripts/build.mjs): dist/cjs -> the package root.\n"
      + "Object.defineProperty(exports, '__esModule', { value: true });\n"
      + "exports.PACKAGE_DIR = require('node:path').resolve(__dirname, '..', '..');\n";
  } else {
    code = ts.transpileModule(readFileSync(path.join(SRC, file), 'utf8'), {
      fileName: file,
      compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true },
    }).outputText;
    if (code.includes('__importDefault')) {
      if (!code.includes(DEFAULT_IMPORT_HELPER)) throw new Error(`${file}: TypeScript's default-import helper changed`);
      code = code.replace(DEFAULT_IMPORT_HELPER, 'return { "default": mod }; // Node ESM: default = module.exports');
    }
  }
  writeFileSync(path.join(CJS, file), code);
}
writeFileSync(path.join(CJS, 'package.json'), '{ "type": "commonjs" }\n');
for (const file of readdirSync(TYPES)) copyFileSync(path.join(TYPES, file), path.join(CJS, file));
console.log(`built ${path.relative(process.cwd(), DIST)}: types/ (${readdirSync(TYPES).join(', ')}), cjs/`);
