// Starts a real pipeserve server for the tests and builds tiny checkpoints with the Python
// test helpers (tests/client_models.py), so the Node client is tested against the same server
// and models as the Python one.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { PipeserveClient, UnavailableError } from '../../src/index.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', '..');

/** $PIPESERVE_PYTHON, else the repository's .venv, else python3 on PATH. */
export function python() {
  if (process.env.PIPESERVE_PYTHON) return process.env.PIPESERVE_PYTHON;
  const venv = path.join(ROOT, '.venv', 'bin', 'python');
  return existsSync(venv) ? venv : 'python3';
}

const PYTHONPATH = ['service', 'clients/python', 'tests'].map((p) => path.join(ROOT, p)).join(path.delimiter);

/** Whether pipeserve.api.<module> exists yet (tests of a task without a servicer skip). */
export function hasServicer(module) {
  return existsSync(path.join(ROOT, 'service', 'pipeserve', 'api', `${module}.py`));
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Builds tiny checkpoints of the given kinds in one Python process; returns {kind: directory}. */
export function buildCheckpoints(kinds) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'pipeserve-node-'));
  const script = [
    'import sys', 'from pathlib import Path', 'from client_models import build',
    'for kind in sys.argv[2:]: build(kind, Path(sys.argv[1]) / kind)',
  ].join('\n');
  const done = spawnSync(python(), ['-c', script, dir, ...kinds], {
    env: { ...process.env, PYTHONPATH }, encoding: 'utf8', timeout: 300_000,
  });
  if (done.status !== 0) throw new Error(`building checkpoints failed:\n${done.stderr}`);
  return { dir, paths: Object.fromEntries(kinds.map((k) => [k, path.join(dir, k)])) };
}

/** A pipeserve server on a free port, without embedded defaults. */
export async function startServer() {
  const port = await freePort();
  const child = spawn(python(), ['-m', 'pipeserve.server', '--listen', `127.0.0.1:${port}`,
    '--embedded-defaults', 'false'], {
    env: { ...process.env, PYTHONPATH, HF_HUB_OFFLINE: '1', PYTHONFAULTHANDLER: '1' }, stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  let stopping = false;
  child.stderr.on('data', (chunk) => { log += chunk; });
  child.on('exit', (code, signal) => {
    if (process.env.PIPESERVE_SERVER_LOG) writeFileSync(process.env.PIPESERVE_SERVER_LOG, `exit ${code ?? signal}\n${log}`);
    if (!stopping) process.stderr.write(`pipeserve server exited unexpectedly (${code ?? signal}):\n${log.slice(-6000)}\n`);
  });
  const address = `127.0.0.1:${port}`;
  const deadline = Date.now() + 120_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`the server exited (${child.exitCode}):\n${log}`);
    const up = await new Promise((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => { socket.end(); resolve(true); });
      socket.on('error', () => resolve(false));
    });
    if (up) break;
    if (Date.now() > deadline) throw new Error(`the server did not start:\n${log}`);
    await new Promise((r) => setTimeout(r, 300));
  }
  // The port answers before the server's services are bound (health NOT_SERVING, every call
  // UNAVAILABLE/STARTING while the runtime imports): wait as a client should, until it serves.
  const probe = new PipeserveClient(address, { timeoutMs: 5_000, retry: { maxAttempts: 1 } });
  try {
    for (;;) {
      if (child.exitCode !== null) throw new Error(`the server exited (${child.exitCode}):\n${log}`);
      try {
        await probe.models.list();
        break;
      } catch (error) {
        if (!(error instanceof UnavailableError)) throw error;
      }
      if (Date.now() > deadline) throw new Error(`the server did not finish starting:\n${log}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  } finally {
    probe.close();
  }
  return {
    address,
    child,
    log: () => log,
    stop: async () => {
      stopping = true;
      child.kill('SIGTERM');
      await new Promise((r) => (child.exitCode !== null ? r() : child.once('exit', r)));
    },
  };
}

export function removeDir(dir) {
  rmSync(dir, { recursive: true, force: true });
}

export { PYTHONPATH };
