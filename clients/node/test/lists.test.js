// Task methods given an array of inputs, against the scripted server of the Python tests
// (tests/client_fakes.py), whose Transcribe is scripted by the audio bytes and reports the
// calls it saw ("stats"): responses in input order, at most maxConcurrency calls in flight,
// the first failure rejects with the input's index and cancels the other calls.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { after, describe, test } from 'node:test';

import { InputError, InvalidArgumentError, PipeserveClient } from '../src/index.js';
import { PYTHONPATH, ROOT, python } from './support/harness.js';

const running = [];

async function fake() {
  const child = spawn(python(), [path.join(ROOT, 'tests', 'client_fakes.py')], {
    env: { ...process.env, PYTHONPATH, GRPC_VERBOSITY: 'ERROR' }, stdio: ['ignore', 'pipe', 'inherit'],
  });
  running.push(child);
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (chunk) => {
      out += chunk;
      if (out.includes('\n')) resolve(out.trim());
    });
    child.once('exit', (code) => reject(new Error(`the scripted server exited (${code})`)));
  });
}

/** What the scripted server saw so far: {peak, cancelled, received} (this call included). */
async function stats(client) {
  const { transcription } = await client.transcribe(Buffer.from('stats'));
  return Object.fromEntries(transcription.text.split(' ').map((pair) => {
    const [key, value] = pair.split('=');
    return [key, Number(value)];
  }));
}

const audio = (script) => Buffer.from(script);

describe('arrays of inputs', () => {
  after(() => running.forEach((child) => child.kill()));

  test('responses in input order, at most maxConcurrency in flight', async () => {
    const client = new PipeserveClient(await fake(), { maxConcurrency: 3, timeoutMs: 30_000 });
    // Each call waits until three have been in flight together; later inputs answer first.
    const inputs = Array.from({ length: 6 }, (_, i) => audio(`gate:3|sleep:${(0.05 * (5 - i)).toFixed(2)}|text:${i}`));
    const results = await client.transcribe(inputs, { requestId: 'same' });
    assert.deepEqual(results.map((r) => r.transcription.text), ['0', '1', '2', '3', '4', '5']);
    assert.ok(results.every((r) => r.request_id === 'same'));
    const seen = await stats(client);
    assert.equal(seen.gate_timeouts, 0, 'fewer than 3 calls were ever in flight together');
    assert.equal(seen.peak, 3);
    assert.deepEqual(await client.transcribe([]), []);
    client.close();
  });

  test('the first failure rejects with its index and cancels the calls in flight', async () => {
    const client = new PipeserveClient(await fake(), { timeoutMs: 30_000 });
    await assert.rejects(client.transcribe([audio('hold'), audio('hold'), audio('gate:4|fail'), audio('hold')]),
      (e) => e instanceof InvalidArgumentError && e.index === 2 && e.reason === 'INVALID_INPUT'
        && e.message.startsWith('input 2: '));
    let seen = await stats(client);
    for (let i = 0; i < 100 && seen.cancelled < 3; i += 1) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      seen = await stats(client);
    }
    // A held call the client did not cancel ends after 10 s without counting as cancelled.
    assert.equal(seen.cancelled, 3, 'the server sees the other calls cancelled');
    assert.equal(seen.gate_timeouts, 0);
    client.close();
  });

  test('inputs whose turn comes after a failure are never sent', async () => {
    const client = new PipeserveClient(await fake(), { maxConcurrency: 1, timeoutMs: 30_000 });
    await assert.rejects(client.transcribe([audio('x'), audio('fail'), audio('x'), audio('x')]),
      (e) => e instanceof InvalidArgumentError && e.index === 1);
    assert.equal((await stats(client)).received, 3, 'two inputs, then this stats call');
    client.close();
  });

  test('arrays of different lengths, streams of arrays and a bad maxConcurrency are input errors', async () => {
    const client = new PipeserveClient('127.0.0.1:1', { timeoutMs: 1000 });
    await assert.rejects(client.answerQuestion(['a', 'b'], ['c', 'd', 'e']),
      (e) => e instanceof InputError && /different lengths \(question: 2, context: 3\)/.test(e.message));
    await assert.rejects(async () => {
      for await (const message of client.transcribeStream(/** @type {any} */ ([audio('x')]))) assert.fail(String(message));
    }, (e) => e instanceof InputError && /takes one input/.test(e.message));
    client.close();
    assert.throws(() => new PipeserveClient('127.0.0.1:1', { maxConcurrency: 0 }), InputError);
  });
});
