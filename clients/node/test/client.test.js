// The Node client against a real pipeserve server: ModelService, image classification (and the
// other tasks whose servicers exist), typed errors with ErrorInfo, ordered bounded map() and arrays of inputs,
// retries on UNAVAILABLE, and the examples.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { deflateSync } from 'node:zlib';

import {
  InputError, InvalidArgumentError, NotFoundError, PermissionDeniedError, PipeserveClient, UnavailableError,
  UnimplementedError,
} from '../src/index.js';
import { buildCheckpoints, hasServicer, removeDir, startServer } from './support/harness.js';

const run = promisify(execFile);
const EXAMPLES = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..', 'examples');

/** A small RGB PNG (no image library needed): a gradient whose colours depend on `seed`. */
function png(seed, width = 24, height = 16) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const out = Buffer.alloc(12 + data.length);
    out.writeUInt32BE(data.length, 0);
    out.write(type, 4, 'ascii');
    data.copy(out, 8);
    out.writeUInt32BE(crc(out.subarray(4, 8 + data.length)), 8 + data.length);
    return out;
  };
  const rows = [];
  for (let y = 0; y < height; y += 1) {
    const row = Buffer.alloc(1 + width * 3);
    for (let x = 0; x < width; x += 1) {
      row[1 + x * 3] = (x * 10 + seed * 37) & 255;
      row[2 + x * 3] = (y * 15 + seed * 91) & 255;
      row[3 + x * 3] = ((x + y) * 7 + seed * 53) & 255;
    }
    rows.push(row);
  }
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8; // bit depth
  header[9] = 2; // RGB
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', header),
    chunk('IDAT', deflateSync(Buffer.concat(rows))), chunk('IEND', Buffer.alloc(0))]);
}

const TASK_KINDS = [
  ['text_generation', 'gpt2'], ['zero_shot_classification', 'nli'], ['document_question_answering', 'layoutlm'],
  ['text_classification', 'sequence_classification'], ['token_classification', 'token_classification'],
  ['question_answering', 'question_answering'], ['fill_mask', 'masked_lm'], ['feature_extraction', 'base'],
  ['speech_recognition', 'ctc'],
];

describe('pipeserve Node client', () => {
  let server;
  let client;
  let checkpoints;
  const names = {};

  before(async () => {
    const kinds = ['vit', ...TASK_KINDS.filter(([module]) => hasServicer(module)).map(([, kind]) => kind)];
    checkpoints = buildCheckpoints(kinds);
    server = await startServer();
    client = new PipeserveClient(server.address, { timeoutMs: 120_000 });
    for (const kind of kinds) {
      const task = kind === 'nli' ? 'zero-shot-classification' : undefined;
      names[kind] = (await client.models.load(checkpoints.paths[kind], { task })).name;
    }
  });

  after(async () => {
    client?.close();
    await server?.stop();
    if (checkpoints) removeDir(checkpoints.dir);
  });

  test('ModelService: list, get, load with options, unload', async () => {
    const listed = await client.models.list();
    assert.ok(listed.some((m) => m.name === names.vit && m.state === 'MODEL_STATE_READY'));
    const images = await client.models.list('image-classification');
    assert.deepEqual(images.map((m) => m.task), images.map(() => 'TASK_IMAGE_CLASSIFICATION'));
    const info = await client.models.get(names.vit);
    assert.equal(info.family, 'vit');
    assert.ok(Number(info.bytes) > 0);

    // Another directory (one directory is one model however it is spelled), named with a
    // trailing slash; the server lists it under its canonical name.
    const copyDir = path.join(checkpoints.dir, 'vit-copy');
    cpSync(checkpoints.paths.vit, copyDir, { recursive: true });
    const copy = `${copyDir}/`;
    const loaded = await client.models.load(copy, { dtype: 'float32', defaultOptions: { top_k: 2 } });
    assert.equal(loaded.dtype, 'D_TYPE_FLOAT32');
    assert.equal(loaded.name, copyDir);
    assert.equal((await client.classifyImage(png(1), { model: copy })).labels.length, 2);
    assert.equal((await client.models.unload(copy)).name, copyDir);
    await assert.rejects(client.models.get(copy), (e) => e instanceof NotFoundError && e.reason === 'MODEL_NOT_FOUND');
  });

  test('classifyImage from a path and from bytes', async (t) => {
    const file = path.join(checkpoints.dir, 'photo.png');
    writeFileSync(file, png(3));
    const fromPath = await client.classifyImage(file, { model: names.vit, topK: 3, requestId: 'n1' });
    const fromBytes = await client.classifyImage(readFileSync(file), { model: names.vit, topK: 3 });
    assert.equal(fromPath.request_id, 'n1');
    assert.equal(fromPath.labels.length, 3);
    assert.deepEqual(fromPath.labels, fromBytes.labels);
    const scores = fromPath.labels.map((l) => l.score);
    assert.deepEqual(scores, [...scores].sort((a, b) => b - a));
    const softmax = await client.classifyImage(file, { model: names.vit, topK: 6, functionToApply: 'softmax' });
    assert.ok(Math.abs(softmax.labels.reduce((s, l) => s + l.score, 0) - 1) < 1e-4);
    t.diagnostic(`labels: ${fromPath.labels.map((l) => `${l.label}=${l.score.toFixed(3)}`).join(' ')}`);
  });

  test('errors are typed and carry the ErrorInfo reason and metadata', async () => {
    await assert.rejects(client.classifyImage(png(0), { model: names.vit, topK: 0 }), (e) =>
      e instanceof InvalidArgumentError && e.reason === 'INVALID_PARAMETER' && e.metadata.field === 'top_k'
      && e.codeName === 'INVALID_ARGUMENT' && !e.retryable);
    await assert.rejects(client.classifyImage(Buffer.from('not an image'), { model: names.vit }),
      (e) => e instanceof InvalidArgumentError && ['UNSUPPORTED_FORMAT', 'INVALID_INPUT'].includes(e.reason));
    // Not loaded, and the server (default settings) loads nothing named in a task call.
    await assert.rejects(client.classifyImage(png(0), { model: 'never-loaded' }),
      (e) => e instanceof NotFoundError && e.reason === 'MODEL_NOT_LOADED');
    await assert.rejects(client.classifyImage('https://example.com/cat.jpg', { model: names.vit }),
      (e) => e instanceof PermissionDeniedError && e.reason === 'URI_NOT_ALLOWED');
    await assert.rejects(client.classifyImage('/definitely/missing.jpg'),
      (e) => e instanceof InputError && e.file && /image file not found/.test(e.message));
    await assert.rejects(client.models.load('/definitely/missing'), (e) => e instanceof NotFoundError);
    // The server keeps serving.
    assert.equal((await client.classifyImage(png(0), { model: names.vit, topK: 1 })).labels.length, 1);
  });

  test('map() keeps input order with bounded in-flight calls', async () => {
    const expected = [];
    for (let i = 0; i < 8; i += 1) expected.push((await client.classifyImage(png(i), { model: names.vit, topK: 2 })).labels);
    let inFlight = 0;
    let peak = 0;
    const results = [];
    for await (const result of client.map([...Array(8).keys()], async (i) => {
      inFlight += 1;
      peak = Math.max(peak, inFlight);
      await new Promise((r) => setTimeout(r, (8 - i) * 5)); // later items finish first
      try {
        return await client.classifyImage(png(i), { model: names.vit, topK: 2 });
      } finally {
        inFlight -= 1;
      }
    }, { concurrency: 3 })) results.push(result.labels);
    // Concurrent calls may be batched by the server: same labels, scores equal to float32 rounding.
    assert.deepEqual(results.map((r) => r.map((l) => l.label)), expected.map((r) => r.map((l) => l.label)));
    results.forEach((r, i) => r.forEach((l, j) => assert.ok(Math.abs(l.score - expected[i][j].score) < 1e-5)));
    assert.ok(peak > 1 && peak <= 3, `peak in flight ${peak}`);
  });

  test('an array of inputs: one call each, responses in input order, a failure names its input', async () => {
    const expected = [];
    for (let i = 0; i < 5; i += 1) expected.push((await client.classifyImage(png(i), { model: names.vit, topK: 2 })).labels);
    const together = new PipeserveClient(server.address, { timeoutMs: 120_000, maxConcurrency: 2 });
    try {
      const results = await together.classifyImage([...Array(5).keys()].map((i) => png(i)), { model: names.vit, topK: 2 });
      // Concurrent calls may be batched by the server: same labels, scores equal to float32 rounding.
      assert.deepEqual(results.map((r) => r.labels.map((l) => l.label)), expected.map((r) => r.map((l) => l.label)));
      results.forEach((r, i) => r.labels.forEach((l, j) => assert.ok(Math.abs(l.score - expected[i][j].score) < 1e-5)));
      await assert.rejects(together.classifyImage([png(1), Buffer.from('not an image'), png(2)], { model: names.vit }),
        (e) => e instanceof InvalidArgumentError && e.index === 1 && e.message.startsWith('input 1: '));
      assert.equal((await together.classifyImage([png(1)], { model: names.vit, topK: 1 }))[0].labels.length, 1);
    } finally {
      together.close();
    }
  });

  test('an unreachable server is UNAVAILABLE after retries', async () => {
    const nowhere = new PipeserveClient('127.0.0.1:1', { retry: { maxAttempts: 3, initialBackoffMs: 10 }, timeoutMs: 5000 });
    const started = Date.now();
    await assert.rejects(nowhere.models.list(), (e) => e instanceof UnavailableError && e.retryable);
    assert.ok(Date.now() - started < 4000);
    nowhere.close();
  });

  test('tasks without a servicer answer UNIMPLEMENTED', async (t) => {
    const missing = TASK_KINDS.filter(([module]) => !hasServicer(module));
    if (!missing.length) return t.skip('every task has a servicer');
    const calls = {
      text_generation: () => client.generate('hi'), zero_shot_classification: () => client.zeroShot('a', ['b']),
      document_question_answering: () => client.documentQa(png(0), 'q'), text_classification: () => client.classifyText('a'),
      token_classification: () => client.classifyTokens('a'), question_answering: () => client.answerQuestion('q', 'c'),
      fill_mask: () => client.fillMask('a'), feature_extraction: () => client.extractFeatures('a'),
      speech_recognition: () => client.transcribe(Buffer.from('RIFF')),
    };
    for (const [module] of missing) {
      await assert.rejects(calls[module](), (e) => e instanceof UnimplementedError && e.reason === 'TASK_NOT_IMPLEMENTED');
    }
    return undefined;
  });

  const task = (module, name, body) => test(name, async (t) => {
    if (!hasServicer(module)) return t.skip(`pipeserve.api.${module} has not landed yet`);
    return body(t);
  });

  task('text_generation', 'generate and generateStream', async () => {
    const options = { model: names.gpt2, maxNewTokens: 5, doSample: false, seed: 7 };
    const whole = await client.generate('The quick brown', options);
    const messages = [];
    for await (const m of client.generateStream('The quick brown', options)) messages.push(m);
    const tokens = messages.filter((m) => m.token);
    const done = messages.filter((m) => m.done).map((m) => m.done);
    assert.equal(done.length, 1);
    assert.equal(done[0].generated_tokens, tokens.length);
    assert.equal(done[0].text, whole.sequences[0].text);
    // Breaking out early cancels the stream; the next call works.
    for await (const m of client.generateStream('The', { model: names.gpt2, maxNewTokens: 50, ignoreEos: true })) {
      assert.ok(m.token);
      break;
    }
    assert.ok((await client.generate('The', { model: names.gpt2, maxNewTokens: 2 })).sequences.length);
  });

  task('text_generation', 'generate with chat messages reaches the model\'s chat template', async () => {
    const messages = [{ role: 'user', content: 'Hello' }];
    // this GPT-2 has no chat template: the server says so, which it can only do for messages it received
    await assert.rejects(client.generate('', { model: names.gpt2, messages }),
      (e) => e instanceof InvalidArgumentError && e.reason === 'CHAT_TEMPLATE_MISSING');
    const stream = client.generateStream('', { model: names.gpt2, messages });
    await assert.rejects(stream.next(), (e) => e instanceof InvalidArgumentError && e.reason === 'CHAT_TEMPLATE_MISSING');
    await assert.rejects(client.generate('', { model: names.gpt2, messages: [] }), (e) => e instanceof InputError);
    await assert.rejects(client.generate('', { model: names.gpt2, messages: [{ role: 'user' }] }),
      (e) => e instanceof InputError);
    await assert.rejects(client.generate('Hi', { model: names.gpt2, messages }), (e) => e instanceof InputError);
  });

  task('zero_shot_classification', 'zeroShot', async () => {
    const response = await client.zeroShot('The fox jumps.', 'animals, politics', { model: names.nli });
    assert.deepEqual(response.labels.map((l) => l.label).sort(), ['animals', 'politics']);
    assert.ok(Math.abs(response.labels.reduce((s, l) => s + l.score, 0) - 1) < 1e-4);
  });

  task('document_question_answering', 'documentQa with word boxes', async () => {
    const response = await client.documentQa(png(0), 'What is the total?', {
      model: names.layoutlm, topK: 2,
      wordBoxes: [['Invoice', [50, 50, 200, 90]], ['total', [50, 150, 150, 190]], ['42', [170, 150, 220, 190]]],
    });
    assert.deepEqual(response.words.map((w) => w.text), ['Invoice', 'total', '42']);
    assert.ok(response.answers.length <= 2);
  });

  task('text_classification', 'classifyText', async () => {
    const response = await client.classifyText('Hugging Face is in Paris.', { model: names.sequence_classification, topK: 2 });
    assert.equal(response.labels.length, 2);
  });

  task('token_classification', 'classifyTokens', async () => {
    const text = 'My name is Wolfgang and I live in Berlin.';
    const response = await client.classifyTokens(text, { model: names.token_classification, aggregationStrategy: 'simple' });
    for (const e of response.entities) assert.ok(text.slice(e.start, e.end).trim());
  });

  task('question_answering', 'answerQuestion', async () => {
    const context = 'Paris is the capital of France.';
    const { answers } = await client.answerQuestion('What is the capital?', context, { model: names.question_answering });
    assert.ok(answers.length && answers.every((a) => context.slice(a.start, a.end) === a.answer));
  });

  task('fill_mask', 'fillMask', async () => {
    const { masks } = await client.fillMask('Paris is the [MASK] of France.', { model: names.masked_lm, topK: 3 });
    assert.equal(masks.length, 1);
    assert.equal(masks[0].candidates.length, 3);
  });

  task('feature_extraction', 'extractFeatures', async () => {
    const r = await client.extractFeatures('The quick brown fox.', { model: names.base, pooling: 'mean', normalize: true });
    assert.equal(r.sentence_embedding.values.length, r.dimensions);
    assert.ok(Math.abs(Math.hypot(...r.sentence_embedding.values) - 1) < 1e-4);
  });

  task('speech_recognition', 'transcribe raw samples and transcribeStream', async () => {
    const samples = new Float32Array(32000).map((_, i) => 0.3 * Math.sin(i / 7) * Math.sin(i / 3000));
    const whole = await client.transcribe({ samples, sampleRate: 16000 }, { model: names.ctc });
    assert.ok(Math.abs(whole.transcription.duration_s - 2) < 0.01);
    const messages = [];
    for await (const m of client.transcribeStream({ samples, sampleRate: 16000 }, { model: names.ctc })) messages.push(m);
    assert.equal(messages.at(-1).done.transcription.text, whole.transcription.text);
  });

  test('examples run against the server', async () => {
    const env = { ...process.env, PIPESERVE_SERVER: server.address };
    const file = path.join(checkpoints.dir, 'example.png');
    writeFileSync(file, png(5));
    const listed = await run(process.execPath, [path.join(EXAMPLES, 'models.mjs')], { env });
    assert.match(listed.stdout, /TASK_IMAGE_CLASSIFICATION/);
    const classified = await run(process.execPath, [path.join(EXAMPLES, 'classify-image.mjs'), file, names.vit], { env });
    assert.equal(classified.stdout.trim().split('\n').length, 3);
    if (hasServicer('text_generation')) {
      const generated = await run(process.execPath, [path.join(EXAMPLES, 'generate.mjs'), 'The quick', names.gpt2], { env });
      assert.match(generated.stdout, /FINISH_REASON_/);
    }
    if (hasServicer('zero_shot_classification')) {
      const scored = await run(process.execPath, [path.join(EXAMPLES, 'zero-shot.mjs'), 'The fox', 'animals,politics', names.nli], { env });
      assert.equal(scored.stdout.trim().split('\n').length, 2);
    }
  });
});
