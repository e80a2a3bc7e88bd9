// The Node client under failure, against the scripted server of the Python tests
// (tests/client_fakes.py): retries only on the documented codes, typed errors with
// ErrorInfo, streams broken after their first message, TLS, mutual TLS and bearer tokens.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { after, describe, test } from 'node:test';

import {
  PipeserveClient, ResourceExhaustedError, StreamInterruptedError, UnauthenticatedError, UnavailableError,
} from '../src/index.js';
import { PYTHONPATH, ROOT, python } from './support/harness.js';

const TLS = path.join(ROOT, 'tests', 'tls');
const FAST = { maxAttempts: 5, initialBackoffMs: 10, maxBackoffMs: 50 };
const running = [];

/** Starts the scripted server with the given arguments; resolves to its address. */
async function fake(...args) {
  const child = spawn(python(), [path.join(ROOT, 'tests', 'client_fakes.py'), ...args], {
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

describe('Node client resilience', () => {
  after(() => running.forEach((child) => child.kill()));

  test('UNAVAILABLE and QUEUE_FULL are retried; other failures are not', async () => {
    const address = await fake('--plan', 'unavailable,queue_full,ok,oom');
    const client = new PipeserveClient(address, { retry: FAST, timeoutMs: 10_000 });
    const started = Date.now();
    const [model] = await client.models.list();
    assert.equal(model.in_flight, 3, 'two failures retried, third call served');
    assert.ok(Date.now() - started >= 50, "QUEUE_FULL's retry_after_ms=50 is honoured");
    await assert.rejects(client.models.list(), (e) => e instanceof ResourceExhaustedError
      && e.reason === 'OUT_OF_MEMORY' && !e.retryable);
    assert.equal((await client.models.list())[0].in_flight, 5, 'OUT_OF_MEMORY was not retried');
    client.close();
  });

  test('the deadline bounds the retry sequence', async () => {
    const address = await fake('--plan', Array(40).fill('queue_full').join(','));
    const client = new PipeserveClient(address, { retry: { maxAttempts: 40, initialBackoffMs: 200, maxBackoffMs: 200 } });
    const started = Date.now();
    await assert.rejects(client.models.list(undefined, { timeoutMs: 500 }),
      (e) => e instanceof ResourceExhaustedError && e.reason === 'QUEUE_FULL');
    assert.ok(Date.now() - started < 1500);
    client.close();
  });

  test('a retry is made only with time left for it', async () => {
    // QUEUE_FULL's retry_after_ms=50 would leave 30 ms of an 80 ms deadline: fail with QUEUE_FULL.
    const address = await fake('--plan', 'queue_full');
    const client = new PipeserveClient(address, { retry: { initialBackoffMs: 1, maxBackoffMs: 1, minAttemptMs: 50 } });
    await assert.rejects(client.models.list(undefined, { timeoutMs: 80 }),
      (e) => e instanceof ResourceExhaustedError && e.reason === 'QUEUE_FULL');
    assert.equal((await client.models.list())[0].in_flight, 2, 'the doomed retry was not made');
    client.close();
  });

  test('streams retry before the first message and report a break after it', async () => {
    const address = await fake('fail_before', 'fail_after');
    const client = new PipeserveClient(address, { retry: FAST, timeoutMs: 10_000 });
    const received = [];
    await assert.rejects(async () => {
      for await (const m of client.generateStream('x')) received.push(m.token.text);
    }, (e) => e instanceof StreamInterruptedError && e.received === 2 && !e.retryable);
    assert.deepEqual(received, ['Once', ' upon']);
    client.close();
  });

  test('transcribeLive sends the configuration, then each chunk, and streams replies', async () => {
    const address = await fake();
    const client = new PipeserveClient(address, { timeoutMs: 10_000 });
    async function* microphone() {
      for (let i = 0; i < 4; i += 1) {
        await new Promise((r) => setTimeout(r, 5));
        yield new Float32Array(1600).fill(0.1 * i); // 0.1 s at 16 kHz
      }
    }
    const messages = [];
    for await (const m of client.transcribeLive(microphone(), { sampleRate: 16000, language: 'en', requestId: 'live' })) {
      messages.push(m);
    }
    assert.deepEqual(messages.slice(0, -1).map((m) => m.segment.is_final), [false, true, false, true]);
    assert.ok(messages.every((m) => m.request_id === 'live'));
    assert.ok(Math.abs(messages.at(-1).done.transcription.duration_s - 0.4) < 1e-6);
    client.close();
  });

  test('TLS, mutual TLS and bearer tokens', async () => {
    const tls = await fake('--tls', 'tls', '--token', 's3cret');
    const port = tls.split(':').at(-1);
    const ok = new PipeserveClient(`127.0.0.1:${port}`, { rootCerts: path.join(TLS, 'ca.pem'), token: 's3cret', timeoutMs: 5000 });
    assert.equal((await ok.models.list())[0].name, 'fake-model');
    ok.close();
    const noToken = new PipeserveClient(`127.0.0.1:${port}`, { rootCerts: path.join(TLS, 'ca.pem'), timeoutMs: 5000 });
    await assert.rejects(noToken.models.list(), (e) => e instanceof UnauthenticatedError);
    noToken.close();
    const wrongCa = new PipeserveClient(`127.0.0.1:${port}`, {
      rootCerts: path.join(TLS, 'other_ca.pem'), token: 's3cret', retry: { maxAttempts: 1 }, timeoutMs: 5000,
    });
    await assert.rejects(wrongCa.models.list(), (e) => e instanceof UnavailableError);
    wrongCa.close();

    const mtls = (await fake('--tls', 'mtls')).split(':').at(-1);
    const mutual = new PipeserveClient(`127.0.0.1:${mtls}`, {
      rootCerts: path.join(TLS, 'ca.pem'), clientCert: path.join(TLS, 'client.pem'), clientKey: path.join(TLS, 'client.key'),
      timeoutMs: 5000,
    });
    assert.equal((await mutual.models.list())[0].name, 'fake-model');
    mutual.close();
    const anonymous = new PipeserveClient(`127.0.0.1:${mtls}`, {
      rootCerts: path.join(TLS, 'ca.pem'), retry: { maxAttempts: 1 }, timeoutMs: 5000,
    });
    await assert.rejects(anonymous.models.list(), (e) => e instanceof UnavailableError);
    anonymous.close();
  });
});
