// The package's root directory (where `protos/` is copied when packed). The CommonJS build
// (scripts/build.mjs) replaces this module with one that uses __dirname, since import.meta
// exists only in ES modules.
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
