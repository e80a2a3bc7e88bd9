// pipeserve client for Node.js: @grpc/grpc-js with the contracts (protos/pipeserve/v1/*.proto)
// loaded at run time by @grpc/proto-loader, so there is no code-generation step.
//
//   import { PipeserveClient } from '@pipeserve/client';
//   const client = new PipeserveClient('127.0.0.1:50051');
//   const { labels } = await client.classifyImage('cat.jpg', { topK: 3 });
//
// A task method given an array of inputs makes one call per input (at most maxConcurrency at
// a time) and resolves to the array of responses in input order, as the pipeline does.
// Messages use the .proto field names (snake_case), enums their full names
// ("FINISH_REASON_LENGTH"), 64-bit integers strings; their TypeScript types (types/messages.d.ts)
// are generated from the .proto files by `npm run build`. Options are camelCase
// ({ topK: 3 } sets top_k) and enum options accept short names ({ returnTimestamps: 'word' }).
// Errors are PipeserveError subclasses carrying the gRPC status and the server's
// google.rpc.ErrorInfo reason and metadata. Retries follow common.proto: UNAVAILABLE, and
// RESOURCE_EXHAUSTED with reason QUEUE_FULL, with jittered exponential backoff, within the
// call's deadline; streams are retried only before their first message.

import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

import { CancelledError, errorFromStatus, InputError, isRetryable, PipeserveError } from './errors.js';
import { PACKAGE_DIR } from './package-dir.js';

export * from './errors.js';

/** @import * as M from './messages.js' */

/** Where the .proto files are: $PIPESERVE_PROTOS, the package's own copy, or the repository's. */
function defaultProtoDir() {
  if (process.env.PIPESERVE_PROTOS) return process.env.PIPESERVE_PROTOS;
  const packaged = path.join(PACKAGE_DIR, 'protos'); // copied in by `npm pack` (prepack)
  return existsSync(packaged) ? packaged : path.resolve(PACKAGE_DIR, '..', '..', 'protos');
}

const PROTO_FILES = [
  'model', 'speech_recognition', 'text_generation', 'image_classification', 'zero_shot_classification',
  'document_question_answering', 'text_classification', 'token_classification', 'question_answering',
  'fill_mask', 'feature_extraction',
].map((name) => `pipeserve/v1/${name}.proto`);

const SERVICES = {
  models: 'ModelService',
  speech: 'SpeechRecognitionService',
  generation: 'TextGenerationService',
  image: 'ImageClassificationService',
  zeroShot: 'ZeroShotClassificationService',
  documentQa: 'DocumentQuestionAnsweringService',
  text: 'TextClassificationService',
  tokens: 'TokenClassificationService',
  qa: 'QuestionAnsweringService',
  fillMask: 'FillMaskService',
  features: 'FeatureExtractionService',
};

/**
 * @typedef {object} RetryPolicy
 * @property {number} [maxAttempts=5]       attempts in all, including the first
 * @property {number} [initialBackoffMs=100]
 * @property {number} [maxBackoffMs=5000]
 * @property {number} [multiplier=2]
 * @property {number} [minAttemptMs=50]     a retry is made only if this much of the deadline is left after its wait
 */

/**
 * @typedef {object} ClientOptions
 * @property {boolean} [tls]                use TLS (implied by rootCerts / clientCert)
 * @property {string|Buffer} [rootCerts]    PEM root certificates, or a path to them
 * @property {string|Buffer} [clientCert]   PEM client certificate for mutual TLS, or a path
 * @property {string|Buffer} [clientKey]    PEM client key for mutual TLS, or a path
 * @property {string} [serverName]          TLS name to verify when it is not the host
 * @property {string} [token]               bearer token sent as `authorization: Bearer ...`
 * @property {number} [timeoutMs]           default deadline of each call
 * @property {RetryPolicy} [retry]
 * @property {string} [protoDir]            directory holding pipeserve/v1/*.proto
 * @property {number} [maxMessageBytes=67108864]
 * @property {number} [maxConcurrency=8]     calls in flight for a task method given an array of inputs
 */

/**
 * @typedef {object} CallOptions
 * @property {string} [model]               model name; empty = the task's default model
 * @property {string} [requestId]           echoed in the response
 * @property {number} [timeoutMs]           deadline of this call (covers its retries); of each input's call for an array
 */

/**
 * @typedef {CallOptions & {returnTimestamps?: boolean|'segment'|'word'|'char'|'none', language?: string,
 *   task?: 'transcribe'|'translate', chunkLengthS?: number, strideLengthS?: number, batchSize?: number,
 *   numBeams?: number, temperature?: number, initialPrompt?: string, maxNewTokens?: number}} TranscribeOptions
 * @typedef {CallOptions & {maxNewTokens?: number, minNewTokens?: number, doSample?: boolean, temperature?: number,
 *   topK?: number, topP?: number, typicalP?: number, repetitionPenalty?: number, noRepeatNgramSize?: number,
 *   stop?: string[], ignoreEos?: boolean, seed?: number|string, numReturnSequences?: number,
 *   returnFullText?: boolean, logprobs?: number, returnLogprobs?: boolean,
 *   messages?: ChatMessage[]}} GenerateOptions
 * @typedef {{role: string, content: string}} ChatMessage  one message of a chat ('system', 'user', 'assistant', ...)
 * @typedef {CallOptions & {topK?: number, functionToApply?: 'sigmoid'|'softmax'|'none'}} ImageClassificationOptions
 * @typedef {CallOptions & {hypothesisTemplate?: string, multiLabel?: boolean}} ZeroShotOptions
 * @typedef {CallOptions & {wordBoxes?: Array<[string, [number, number, number, number]]>, topK?: number,
 *   maxAnswerLen?: number, docStride?: number, maxSeqLen?: number, maxQuestionLen?: number,
 *   handleImpossibleAnswer?: boolean, lang?: string}} DocumentQaOptions
 * @typedef {CallOptions & {textPair?: string, topK?: number, functionToApply?: 'sigmoid'|'softmax'|'none'}} TextClassificationOptions
 * @typedef {CallOptions & {aggregationStrategy?: 'none'|'simple'|'first'|'average'|'max', ignoreLabels?: string[],
 *   stride?: number}} TokenClassificationOptions
 * @typedef {CallOptions & {topK?: number, docStride?: number, maxAnswerLen?: number, maxSeqLen?: number,
 *   maxQuestionLen?: number, handleImpossibleAnswer?: boolean, alignToWords?: boolean}} QuestionAnsweringOptions
 * @typedef {CallOptions & {topK?: number, targets?: string[]}} FillMaskOptions
 * @typedef {CallOptions & {pooling?: 'none'|'mean'|'cls'|'max', normalize?: boolean, truncate?: boolean}} FeatureExtractionOptions
 */

/** @typedef {string|Buffer|Uint8Array} ImageLike  a path, an http(s)/file URI, or encoded bytes */
/**
 * @typedef {string|Buffer|Uint8Array|{samples: Float32Array|Int16Array, sampleRate: number, channels?: number}} AudioLike
 *   a path, a URI, encoded file bytes, or raw samples (float -1..1 or int16, interleaved)
 */

const URI = /^(https?|file):\/\//i;

/** camelCase option names -> the request's snake_case field names. */
function snake(name) {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

/** 'word' -> 'TIMESTAMP_GRANULARITY_WORD' for enum options given by short name. */
function enumName(prefix, value) {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'number') return value;
  const name = String(value).toUpperCase().replace(/-/g, '_');
  return name.startsWith(prefix) ? name : prefix + name;
}

const ENUM_OPTIONS = {
  return_timestamps: 'TIMESTAMP_GRANULARITY_',
  task: 'SPEECH_TASK_',
  function_to_apply: 'FUNCTION_TO_APPLY_',
  aggregation_strategy: 'AGGREGATION_STRATEGY_',
  pooling: 'POOLING_',
  dtype: 'D_TYPE_',
  weights_dtype: 'D_TYPE_',
  quantization: 'QUANTIZATION_',
};

/** Options object -> request fields: camelCase to snake_case, enum short names, unset dropped. */
function fields(options, skip = []) {
  const out = {};
  for (const [key, value] of Object.entries(options ?? {})) {
    if (value === undefined || value === null || skip.includes(key)) continue;
    const name = snake(key);
    if (name === 'return_timestamps' && typeof value === 'boolean') {
      out[name] = value ? 'TIMESTAMP_GRANULARITY_SEGMENT' : 'TIMESTAMP_GRANULARITY_NONE';
    } else {
      out[name] = ENUM_OPTIONS[name] ? enumName(ENUM_OPTIONS[name], value) : value;
    }
  }
  return out;
}

const CALL_KEYS = ['model', 'requestId', 'timeoutMs'];

/** The option under which one input's call of an array learns its CallScope (a symbol, so
 * it never becomes a request field). */
const SCOPE = Symbol('pipeserve.callScope');

/** The calls in flight for one task call on an array of inputs, cancelled together when an
 * input fails. */
class CallScope {
  constructor() {
    this.cancelled = false;
    /** @type {Set<{cancel(): void}>} */
    this.calls = new Set();
  }

  cancel() {
    this.cancelled = true;
    for (const call of this.calls) call.cancel();
    this.calls.clear();
  }
}

/**
 * The arguments of each input's call when any of `inputs` (argument name -> value) is an
 * array, else null. Arrays given for several arguments are paired in order and must have one
 * length; a single value goes with every input.
 * @param {string} method
 * @param {Record<string, any>} inputs
 * @returns {Array<Record<string, any>>|null}
 */
function itemsOf(method, inputs) {
  const lists = Object.entries(inputs).filter(([, value]) => Array.isArray(value));
  if (lists.length === 0) return null;
  const lengths = new Set(lists.map(([, value]) => value.length));
  if (lengths.size > 1) {
    const given = lists.map(([name, value]) => `${name}: ${value.length}`).join(', ');
    throw new InputError(`${method}() got arrays of different lengths (${given}); give arrays of one length, `
      + 'or a single value to pair with every input');
  }
  const count = lists[0][1].length;
  return Array.from({ length: count }, (_, index) => Object.fromEntries(
    Object.entries(inputs).map(([name, value]) => [name, Array.isArray(value) ? value[index] : value])));
}

/**
 * One input's options: the caller's, plus the scope its call registers with.
 * @param {object} options
 * @param {CallScope} scope
 * @returns {any} the method's own options type (the symbol key is invisible to it)
 */
function inScope(options, scope) {
  return { ...options, [SCOPE]: scope };
}

/** Streaming methods take one input. */
function oneInput(method, input) {
  if (Array.isArray(input)) {
    throw new InputError(`${method}() takes one input, not an array: stream each input in turn, or call the `
      + 'non-streaming method to get an array of responses');
  }
}

/**
 * A chat's messages as the request carries them; checked here so a mistake fails before a call.
 * @param {string} prompt
 * @param {ChatMessage[]|undefined} messages
 * @returns {ChatMessage[]}
 */
function chatMessages(prompt, messages) {
  if (messages === undefined || messages === null) return [];
  if (!Array.isArray(messages) || messages.length === 0) {
    throw new InputError('messages must be a non-empty array of {role, content} messages');
  }
  if (prompt) throw new InputError('generate() takes a prompt or messages, not both');
  return messages.map((message, index) => {
    if (typeof message?.role !== 'string' || typeof message?.content !== 'string') {
      throw new InputError(`messages[${index}] needs a role and a content string`);
    }
    return { role: message.role, content: message.content };
  });
}

/** Marks the error of a failed input of an array with its index ("input 2: ..."). */
function markInput(error, index) {
  if (error instanceof PipeserveError) {
    error.index = index;
    error.message = `input ${index}: ${error.message}`;
  } else if (error instanceof Error) {
    error.message = `input ${index}: ${error.message}`;
  }
  return error;
}

async function readInput(value, what) {
  try {
    return await readFile(value);
  } catch (error) {
    const reason = { ENOENT: 'not found', EISDIR: 'is a directory', EACCES: 'is not readable' }[error.code];
    throw new InputError(`${what} file ${reason ?? `cannot be read (${error.code})`}: ${value}`, { file: true });
  }
}

async function imageInput(image) {
  if (typeof image === 'string') {
    return URI.test(image) ? { uri: image } : { data: await readInput(image, 'image') };
  }
  if (image instanceof Uint8Array) return { data: Buffer.from(image) };
  throw new InputError('an image must be a path, a URI, or a Buffer of encoded image bytes');
}

async function audioInput(audio) {
  if (typeof audio === 'string') {
    return URI.test(audio) ? { uri: audio } : { data: await readInput(audio, 'audio') };
  }
  if (audio instanceof Uint8Array) return { data: Buffer.from(audio) };
  if (audio && (audio.samples instanceof Float32Array || audio.samples instanceof Int16Array)) {
    if (!(audio.sampleRate > 0)) throw new InputError('raw audio samples need sampleRate (in hertz)');
    const float = audio.samples instanceof Float32Array;
    const bytes = Buffer.alloc(audio.samples.length * (float ? 4 : 2));
    audio.samples.forEach((v, i) => (float ? bytes.writeFloatLE(v, i * 4) : bytes.writeInt16LE(v, i * 2)));
    return {
      raw: {
        samples: bytes,
        format: float ? 'SAMPLE_FORMAT_FLOAT32_LE' : 'SAMPLE_FORMAT_INT16_LE',
        sample_rate: audio.sampleRate,
        channels: audio.channels ?? 1,
      },
    };
  }
  throw new InputError('audio must be a path, a URI, a Buffer of file bytes, or {samples, sampleRate}');
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Full-jitter exponential backoff, never below the server's retry_after_ms hint. */
export function backoffMs(policy, retry, error) {
  const cap = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * policy.multiplier ** retry);
  let delay = Math.random() * cap;
  const hint = Number(error?.metadata?.retry_after_ms);
  if (Number.isFinite(hint)) delay = Math.max(delay, hint);
  return delay;
}

async function pem(value) {
  if (value === undefined || value === null) return null;
  if (Buffer.isBuffer(value)) return value;
  if (String(value).trimStart().startsWith('-----BEGIN')) return Buffer.from(String(value));
  return readInput(value, 'TLS certificate');
}

export class PipeserveClient {
  /**
   * @param {string} [target] "host:port"; default $PIPESERVE_SERVER or 127.0.0.1:50051
   * @param {ClientOptions} [options]
   */
  constructor(target, options = {}) {
    this.target = target || process.env.PIPESERVE_SERVER || '127.0.0.1:50051';
    this.options = options;
    this.timeoutMs = options.timeoutMs;
    this.maxConcurrency = options.maxConcurrency ?? 8;
    if (!Number.isInteger(this.maxConcurrency) || this.maxConcurrency < 1) {
      throw new InputError(`maxConcurrency must be an integer of at least 1, got ${options.maxConcurrency}`);
    }
    this.retry = {
      maxAttempts: 5, initialBackoffMs: 100, maxBackoffMs: 5000, multiplier: 2, minAttemptMs: 50, ...options.retry,
    };
    const packageDefinition = protoLoader.loadSync(PROTO_FILES, {
      keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
      includeDirs: [options.protoDir ?? defaultProtoDir()],
    });
    this.proto = /** @type {any} */ (grpc.loadPackageDefinition(packageDefinition)).pipeserve.v1;
    this._stubs = null;
    this._ready = this._connect();
    this._ready.catch(() => {}); // surfaced by the first call
    /** ModelService. */
    this.models = {
      /**
       * @param {string} [task] a pipeline task name such as "image-classification"
       * @param {{timeoutMs?: number}} [call]
       * @returns {Promise<M.ModelInfo[]>}
       */
      list: async (task, call = {}) => (await this._unary('models', 'ListModels',
        task ? { task: enumName('TASK_', task) } : {}, call)).models,
      /**
       * @param {string} model
       * @param {{timeoutMs?: number}} [call]
       * @returns {Promise<M.ModelInfo>}
       */
      get: async (model, call = {}) => (await this._unary('models', 'GetModel', { model }, call)).model,
      /**
       * @param {string} model a local directory or Hub id
       * @param {{task?: string, revision?: string, device?: string, dtype?: string, weightsDtype?: string,
       *          loadIn8bit?: boolean,
       *          allowPickle?: boolean, setDefault?: boolean, defaultOptions?: object, timeoutMs?: number}} [options]
       * @returns {Promise<M.ModelInfo>}
       */
      load: async (model, options = {}) => {
        const { defaultOptions, task, timeoutMs, ...rest } = options;
        /** @type {Record<string, any>} */
        const request = { model, ...fields(rest) };
        if (task) request.task = enumName('TASK_', task);
        if (defaultOptions) request.default_options = toStruct(defaultOptions);
        return (await this._unary('models', 'LoadModel', request, { timeoutMs })).model;
      },
      /**
       * @param {string} model
       * @param {{timeoutMs?: number}} [call]
       * @returns {Promise<M.ModelInfo>}
       */
      unload: async (model, call = {}) => (await this._unary('models', 'UnloadModel', { model }, call)).model,
    };
  }

  async _connect() {
    const o = this.options;
    const [roots, cert, key] = await Promise.all([pem(o.rootCerts), pem(o.clientCert), pem(o.clientKey)]);
    if ((cert === null) !== (key === null)) throw new InputError('mutual TLS needs both clientCert and clientKey');
    const tls = o.tls || roots || cert;
    const credentials = tls ? grpc.credentials.createSsl(roots, key, cert) : grpc.credentials.createInsecure();
    const max = o.maxMessageBytes ?? 64 * 1024 * 1024;
    const channelOptions = {
      'grpc.max_receive_message_length': max,
      'grpc.max_send_message_length': max,
      'grpc.primary_user_agent': 'pipeserve-node/0.1',
      'grpc.keepalive_time_ms': 20000,
      'grpc.keepalive_timeout_ms': 10000,
    };
    if (o.serverName) channelOptions['grpc.ssl_target_name_override'] = o.serverName;
    this._stubs = {};
    for (const [key_, service] of Object.entries(SERVICES)) {
      this._stubs[key_] = new this.proto[service](this.target, credentials, channelOptions);
    }
  }

  /** Closes the connections. */
  close() {
    for (const stub of Object.values(this._stubs ?? {})) stub.close();
  }

  _metadata() {
    const metadata = new grpc.Metadata();
    if (this.options.token) metadata.set('authorization', `Bearer ${this.options.token}`);
    return metadata;
  }

  _deadlineAt(call) {
    const timeout = call?.timeoutMs ?? this.timeoutMs;
    return timeout === undefined ? undefined : Date.now() + timeout;
  }

  /**
   * Whether, after waiting delayMs, at least retry.minAttemptMs of the deadline is left: a call
   * that runs out of time fails with the error that made it retry, not with a DEADLINE_EXCEEDED
   * from an attempt that never had a chance.
   */
  _leavesTime(end, delayMs) {
    return end === undefined || Date.now() + delayMs + this.retry.minAttemptMs <= end;
  }

  async _unary(service, method, request, call = {}) {
    await this._ready;
    const stub = this._stubs[service];
    const end = this._deadlineAt(call);
    /** @type {CallScope|undefined} set when this call is one input of an array */
    const scope = call[SCOPE];
    for (let attempt = 1; ; attempt += 1) {
      let error;
      if (scope?.cancelled) throw new CancelledError('cancelled: another input of the array failed', { code: grpc.status.CANCELLED, method });
      /** @type {any} */
      let pending;
      try {
        return await new Promise((resolve, reject) => {
          const options = end === undefined ? {} : { deadline: new Date(end) };
          pending = stub[method](request, this._metadata(), options,
            (err, response) => (err ? reject(err) : resolve(response)));
          scope?.calls.add(pending);
        });
      } catch (raw) {
        error = errorFromStatus(raw, method);
      } finally {
        scope?.calls.delete(pending);
      }
      const delay = backoffMs(this.retry, attempt - 1, error);
      if (!isRetryable(error) || attempt >= this.retry.maxAttempts || !this._leavesTime(end, delay)) throw error;
      await sleep(delay);
      if (!this._leavesTime(end, 0)) throw error; // the sleep overran on a busy machine
    }
  }

  async *_stream(service, method, request, call = {}) {
    await this._ready;
    const stub = this._stubs[service];
    const end = this._deadlineAt(call);
    for (let attempt = 1; ; attempt += 1) {
      let received = 0;
      let error;
      const stream = stub[method](request, this._metadata(), end === undefined ? {} : { deadline: new Date(end) });
      try {
        for await (const message of stream) {
          received += 1;
          yield message;
        }
        return;
      } catch (raw) {
        error = errorFromStatus(raw, method, received);
      } finally {
        stream.cancel(); // no-op when finished; stops the server's work when the caller breaks early
      }
      const delay = backoffMs(this.retry, attempt - 1, error);
      if (received || !isRetryable(error) || attempt >= this.retry.maxAttempts || !this._leavesTime(end, delay)) {
        throw error;
      }
      await sleep(delay);
      if (!this._leavesTime(end, 0)) throw error;
    }
  }

  // --- tasks ---------------------------------------------------------------------------------
  // Each task method takes one input, or an array of inputs as the pipeline does: one call per
  // input, at most `maxConcurrency` in flight, the responses in input order (see _each).

  /**
   * Speech -> text (pipeline("automatic-speech-recognition")).
   * @overload
   * @param {AudioLike[]} audio  several inputs: one call each, responses in order
   * @param {TranscribeOptions} [options]
   * @returns {Promise<M.TranscribeResponse[]>}
   */
  /**
   * @overload
   * @param {AudioLike} audio
   * @param {TranscribeOptions} [options]
   * @returns {Promise<M.TranscribeResponse>}
   */
  /**
   * @param {AudioLike|AudioLike[]} audio
   * @param {TranscribeOptions} [options]
   * @returns {Promise<M.TranscribeResponse|M.TranscribeResponse[]>}
   */
  async transcribe(audio, options = {}) {
    const items = itemsOf('transcribe', { audio });
    if (items) {
      return this._each(items, (item, scope) => this.transcribe(
        /** @type {AudioLike} */ (item.audio), inScope(options, scope)));
    }
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', audio: await audioInput(audio),
      options: fields(options, CALL_KEYS) };
    return this._unary('speech', 'Transcribe', request, options);
  }

  /**
   * Streams segments as each window is decoded, then a `done` message with the full transcription.
   * @param {AudioLike} audio  one input (stream the inputs of a list one by one)
   * @param {TranscribeOptions} [options]
   * @returns {AsyncGenerator<M.TranscribeStreamResponse>}
   */
  async *transcribeStream(audio, options = {}) {
    oneInput('transcribeStream', audio);
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', audio: await audioInput(audio),
      options: fields(options, CALL_KEYS) };
    yield* this._stream('speech', 'TranscribeStream', request, options);
  }

  /**
   * Live audio (bidirectional): sends the configuration, then one chunk per item of `chunks`
   * as it arrives, and yields interim and final segments as the server decodes them, then
   * `done` after the last chunk. Never retried (the audio cannot be replayed).
   * @param {Iterable<Float32Array|Int16Array>|AsyncIterable<Float32Array|Int16Array>} chunks
   *   samples (float -1..1 or int16), interleaved when there are several channels
   * @param {TranscribeOptions & {sampleRate: number, channels?: number, interimIntervalS?: number}} options
   * @returns {AsyncGenerator<M.StreamingTranscribeResponse>}
   */
  async *transcribeLive(chunks, options) {
    await this._ready;
    const { sampleRate, channels = 1, interimIntervalS, ...rest } = options ?? /** @type {any} */ ({});
    if (!(sampleRate > 0)) throw new InputError('live audio needs sampleRate (in hertz)');
    const end = this._deadlineAt(rest);
    const call = this._stubs.speech.StreamingTranscribe(this._metadata(), end === undefined ? {} : { deadline: new Date(end) });
    /** @type {Record<string, any>} */
    const config = {
      model: rest.model ?? '', request_id: rest.requestId ?? '', options: fields(rest, CALL_KEYS),
      sample_rate: sampleRate, channels, format: 'SAMPLE_FORMAT_FLOAT32_LE',
    };
    if (interimIntervalS !== undefined) config.interim_interval_s = interimIntervalS;
    const send = (async () => {
      let first = true;
      for await (const samples of chunks) {
        const { raw } = await audioInput({ samples, sampleRate, channels });
        if (first) {
          call.write({ config: { ...config, format: raw.format } });
          first = false;
        }
        call.write({ audio: { samples: raw.samples } });
      }
      if (first) call.write({ config });
      call.end();
    })();
    send.catch((error) => call.cancel(String(error)));
    let received = 0;
    try {
      for await (const message of call) {
        received += 1;
        yield message;
      }
      await send;
    } catch (raw) {
      throw errorFromStatus(raw, 'StreamingTranscribe', received);
    } finally {
      call.cancel();
    }
  }

  /**
   * Prompt -> text (pipeline("text-generation")). For a chat, pass '' and `options.messages`
   * ([{role, content}, ...]): the model's chat template renders it and the text is the
   * assistant's reply.
   * @overload
   * @param {string[]} prompt  several prompts: one call each, responses in order
   * @param {GenerateOptions} [options]
   * @returns {Promise<M.GenerateResponse[]>}
   */
  /**
   * @overload
   * @param {string} prompt
   * @param {GenerateOptions} [options]
   * @returns {Promise<M.GenerateResponse>}
   */
  /**
   * @param {string|string[]} prompt
   * @param {GenerateOptions} [options]
   * @returns {Promise<M.GenerateResponse|M.GenerateResponse[]>}
   */
  async generate(prompt, options = {}) {
    const items = itemsOf('generate', { prompt });
    if (items) {
      return this._each(items, (item, scope) => this.generate(
        /** @type {string} */ (item.prompt), inScope(options, scope)));
    }
    return this._unary('generation', 'Generate', this._generateRequest(prompt, options), options);
  }

  /**
   * Streams one message per generated token, then `done` per sequence.
   * @param {string} prompt  one prompt
   * @param {GenerateOptions} [options]
   * @returns {AsyncGenerator<M.GenerateStreamResponse>}
   */
  async *generateStream(prompt, options = {}) {
    oneInput('generateStream', prompt);
    yield* this._stream('generation', 'GenerateStream', this._generateRequest(prompt, options), options);
  }

  _generateRequest(prompt, options) {
    return { model: options.model ?? '', request_id: options.requestId ?? '', prompt,
      messages: chatMessages(prompt, options.messages), options: fields(options, [...CALL_KEYS, 'messages']) };
  }

  /**
   * Image -> labels (pipeline("image-classification")).
   * @overload
   * @param {ImageLike[]} image  several images: one call each, responses in order
   * @param {ImageClassificationOptions} [options]
   * @returns {Promise<M.ClassifyImageResponse[]>}
   */
  /**
   * @overload
   * @param {ImageLike} image
   * @param {ImageClassificationOptions} [options]
   * @returns {Promise<M.ClassifyImageResponse>}
   */
  /**
   * @param {ImageLike|ImageLike[]} image
   * @param {ImageClassificationOptions} [options]
   * @returns {Promise<M.ClassifyImageResponse|M.ClassifyImageResponse[]>}
   */
  async classifyImage(image, options = {}) {
    const items = itemsOf('classifyImage', { image });
    if (items) {
      return this._each(items, (item, scope) => this.classifyImage(
        /** @type {ImageLike} */ (item.image), inScope(options, scope)));
    }
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', image: await imageInput(image),
      ...fields(options, CALL_KEYS) };
    return this._unary('image', 'ClassifyImage', request, options);
  }

  /**
   * Text + labels of your choosing -> scores (pipeline("zero-shot-classification")).
   * @overload
   * @param {string[]} sequence  several texts, each scored against the same labels; responses in order
   * @param {string[]|string} candidateLabels  a list, or "a, b, c"
   * @param {ZeroShotOptions} [options]
   * @returns {Promise<M.ClassifyZeroShotResponse[]>}
   */
  /**
   * @overload
   * @param {string} sequence
   * @param {string[]|string} candidateLabels  a list, or "a, b, c"
   * @param {ZeroShotOptions} [options]
   * @returns {Promise<M.ClassifyZeroShotResponse>}
   */
  /**
   * @param {string|string[]} sequence
   * @param {string[]|string} candidateLabels
   * @param {ZeroShotOptions} [options]
   * @returns {Promise<M.ClassifyZeroShotResponse|M.ClassifyZeroShotResponse[]>}
   */
  async zeroShot(sequence, candidateLabels, options = {}) {
    const items = itemsOf('zeroShot', { sequence });
    if (items) {
      return this._each(items, (item, scope) => this.zeroShot(
        /** @type {string} */ (item.sequence), candidateLabels, inScope(options, scope)));
    }
    const labels = typeof candidateLabels === 'string'
      ? candidateLabels.split(',').map((s) => s.trim()).filter(Boolean) : candidateLabels;
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', sequence,
      candidate_labels: labels, ...fields(options, CALL_KEYS) };
    return this._unary('zeroShot', 'ClassifyZeroShot', request, options);
  }

  /**
   * Document image + question -> answers (pipeline("document-question-answering")). Arrays of
   * images and/or questions are paired in order (a single one goes with each).
   * @overload
   * @param {ImageLike[]} image
   * @param {string|string[]} question
   * @param {DocumentQaOptions} [options]
   * @returns {Promise<M.AnswerDocumentQuestionResponse[]>}
   */
  /**
   * @overload
   * @param {ImageLike} image
   * @param {string[]} question
   * @param {DocumentQaOptions} [options]
   * @returns {Promise<M.AnswerDocumentQuestionResponse[]>}
   */
  /**
   * @overload
   * @param {ImageLike} image
   * @param {string} question
   * @param {DocumentQaOptions} [options]
   * @returns {Promise<M.AnswerDocumentQuestionResponse>}
   */
  /**
   * @param {ImageLike|ImageLike[]} image
   * @param {string|string[]} question
   * @param {DocumentQaOptions} [options]
   * @returns {Promise<M.AnswerDocumentQuestionResponse|M.AnswerDocumentQuestionResponse[]>}
   */
  async documentQa(image, question, options = {}) {
    const items = itemsOf('documentQa', { image, question });
    if (items) {
      return this._each(items, (item, scope) => this.documentQa(
        /** @type {ImageLike} */ (item.image), /** @type {string} */ (item.question), inScope(options, scope)));
    }
    const { wordBoxes, lang, ...rest } = options;
    /** @type {Record<string, any>} */
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', image: await imageInput(image),
      question, ...fields(rest, CALL_KEYS) };
    if (lang) request.ocr_lang = lang;
    if (wordBoxes) {
      request.words = wordBoxes.map(([text, [x0, y0, x1, y1]]) => ({ text, box: { x0, y0, x1, y1 } }));
    }
    return this._unary('documentQa', 'AnswerDocumentQuestion', request, options);
  }

  /**
   * Text (or a pair) -> labels (pipeline("text-classification")).
   * @overload
   * @param {string[]} text  several texts: one call each, responses in order
   * @param {TextClassificationOptions} [options]
   * @returns {Promise<M.ClassifyTextResponse[]>}
   */
  /**
   * @overload
   * @param {string} text
   * @param {TextClassificationOptions} [options]
   * @returns {Promise<M.ClassifyTextResponse>}
   */
  /**
   * @param {string|string[]} text
   * @param {TextClassificationOptions} [options]
   * @returns {Promise<M.ClassifyTextResponse|M.ClassifyTextResponse[]>}
   */
  async classifyText(text, options = {}) {
    const items = itemsOf('classifyText', { text });
    if (items) {
      return this._each(items, (item, scope) => this.classifyText(
        /** @type {string} */ (item.text), inScope(options, scope)));
    }
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', text, ...fields(options, CALL_KEYS) };
    return this._unary('text', 'ClassifyText', request, options);
  }

  /**
   * Text -> entities (pipeline("token-classification"), a.k.a. "ner").
   * @overload
   * @param {string[]} text  several texts: one call each, responses in order
   * @param {TokenClassificationOptions} [options]
   * @returns {Promise<M.ClassifyTokensResponse[]>}
   */
  /**
   * @overload
   * @param {string} text
   * @param {TokenClassificationOptions} [options]
   * @returns {Promise<M.ClassifyTokensResponse>}
   */
  /**
   * @param {string|string[]} text
   * @param {TokenClassificationOptions} [options]
   * @returns {Promise<M.ClassifyTokensResponse|M.ClassifyTokensResponse[]>}
   */
  async classifyTokens(text, options = {}) {
    const items = itemsOf('classifyTokens', { text });
    if (items) {
      return this._each(items, (item, scope) => this.classifyTokens(
        /** @type {string} */ (item.text), inScope(options, scope)));
    }
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', text, ...fields(options, CALL_KEYS) };
    return this._unary('tokens', 'ClassifyTokens', request, options);
  }

  /**
   * Question + context -> answer spans (pipeline("question-answering")). Arrays of questions
   * and/or contexts are paired in order (a single one goes with each).
   * @overload
   * @param {string[]} question
   * @param {string|string[]} context
   * @param {QuestionAnsweringOptions} [options]
   * @returns {Promise<M.AnswerQuestionResponse[]>}
   */
  /**
   * @overload
   * @param {string} question
   * @param {string[]} context
   * @param {QuestionAnsweringOptions} [options]
   * @returns {Promise<M.AnswerQuestionResponse[]>}
   */
  /**
   * @overload
   * @param {string} question
   * @param {string} context
   * @param {QuestionAnsweringOptions} [options]
   * @returns {Promise<M.AnswerQuestionResponse>}
   */
  /**
   * @param {string|string[]} question
   * @param {string|string[]} context
   * @param {QuestionAnsweringOptions} [options]
   * @returns {Promise<M.AnswerQuestionResponse|M.AnswerQuestionResponse[]>}
   */
  async answerQuestion(question, context, options = {}) {
    const items = itemsOf('answerQuestion', { question, context });
    if (items) {
      return this._each(items, (item, scope) => this.answerQuestion(
        /** @type {string} */ (item.question), /** @type {string} */ (item.context), inScope(options, scope)));
    }
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', question, context,
      ...fields(options, CALL_KEYS) };
    return this._unary('qa', 'AnswerQuestion', request, options);
  }

  /**
   * Text with mask token(s) -> candidates per mask (pipeline("fill-mask")).
   * @overload
   * @param {string[]} text  several texts: one call each, responses in order
   * @param {FillMaskOptions} [options]
   * @returns {Promise<M.FillMaskResponse[]>}
   */
  /**
   * @overload
   * @param {string} text
   * @param {FillMaskOptions} [options]
   * @returns {Promise<M.FillMaskResponse>}
   */
  /**
   * @param {string|string[]} text
   * @param {FillMaskOptions} [options]
   * @returns {Promise<M.FillMaskResponse|M.FillMaskResponse[]>}
   */
  async fillMask(text, options = {}) {
    const items = itemsOf('fillMask', { text });
    if (items) {
      return this._each(items, (item, scope) => this.fillMask(
        /** @type {string} */ (item.text), inScope(options, scope)));
    }
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', text, ...fields(options, CALL_KEYS) };
    return this._unary('fillMask', 'FillMask', request, options);
  }

  /**
   * Text -> embedding(s) (pipeline("feature-extraction")).
   * @overload
   * @param {string[]} text  several texts: one call each, responses in order
   * @param {FeatureExtractionOptions} [options]
   * @returns {Promise<M.ExtractFeaturesResponse[]>}
   */
  /**
   * @overload
   * @param {string} text
   * @param {FeatureExtractionOptions} [options]
   * @returns {Promise<M.ExtractFeaturesResponse>}
   */
  /**
   * @param {string|string[]} text
   * @param {FeatureExtractionOptions} [options]
   * @returns {Promise<M.ExtractFeaturesResponse|M.ExtractFeaturesResponse[]>}
   */
  async extractFeatures(text, options = {}) {
    const items = itemsOf('extractFeatures', { text });
    if (items) {
      return this._each(items, (item, scope) => this.extractFeatures(
        /** @type {string} */ (item.text), inScope(options, scope)));
    }
    const request = { model: options.model ?? '', request_id: options.requestId ?? '', text, ...fields(options, CALL_KEYS) };
    return this._unary('features', 'ExtractFeatures', request, options);
  }

  /**
   * One call per input (`one(item, scope)`), at most maxConcurrency in flight; the responses
   * in input order. The first input to fail rejects the whole call with its error, marked
   * with the input's `index`; the calls in flight are cancelled and the others never start.
   * @template R
   * @param {Array<Record<string, any>>} items
   * @param {(item: Record<string, any>, scope: CallScope) => Promise<R>} one
   * @returns {Promise<R[]>}
   */
  async _each(items, one) {
    const scope = new CallScope();
    /** @type {R[]} */
    const results = new Array(items.length);
    /** @type {{index: number, error: any}|null} */
    let failure = null;
    let next = 0;
    const worker = async () => {
      while (failure === null && next < items.length) {
        const index = next;
        next += 1;
        try {
          results[index] = await one(items[index], scope);
        } catch (error) {
          if (failure === null) {
            failure = { index, error };
            scope.cancel();
          }
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.maxConcurrency, items.length) }, worker));
    if (failure !== null) throw markInput(failure.error, failure.index);
    return results;
  }

  /**
   * Runs fn(item) for each input with at most `concurrency` calls in flight and yields the
   * results in input order (the iterable is consumed lazily).
   * @template T, R
   * @param {Iterable<T>|AsyncIterable<T>} inputs
   * @param {(item: T) => Promise<R>} fn
   * @param {{concurrency?: number}} [options]
   * @returns {AsyncGenerator<R>}
   */
  async *map(inputs, fn, { concurrency = 8 } = {}) {
    if (!(concurrency >= 1)) throw new InputError('concurrency must be at least 1');
    const pending = [];
    for await (const item of inputs) {
      const promise = fn(item);
      promise.catch(() => {}); // awaited in order below; avoid an unhandled rejection meanwhile
      pending.push(promise);
      if (pending.length >= concurrency) yield await pending.shift();
    }
    while (pending.length) yield await pending.shift();
  }
}

/** A plain object -> google.protobuf.Struct. protobufjs bundles the well-known types with
 * camelCase field names (numberValue), whatever keepCase says for our own messages. */
function toStruct(object) {
  const value = (v) => {
    if (v === null || v === undefined) return { nullValue: 'NULL_VALUE' };
    if (typeof v === 'number') return { numberValue: v };
    if (typeof v === 'string') return { stringValue: v };
    if (typeof v === 'boolean') return { boolValue: v };
    if (Array.isArray(v)) return { listValue: { values: v.map(value) } };
    return { structValue: toStruct(v) };
  };
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, value(v)])) };
}
