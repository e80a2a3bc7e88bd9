// The demo page: uploads go to the HTTP bridge (demo.py), which calls the gRPC service;
// streams come back as Server-Sent Events read with fetch(); the live microphone streams
// both ways over a WebSocket.

const $ = (id) => document.getElementById(id);

function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle('error', isError);
}

function describeError(error) {
  const reason = error.reason ? ` [${error.reason}]` : '';
  return `${error.error}${error.code ? ` (${error.code}${reason})` : ''}`;
}

async function jsonOrError(response) {
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw body;
  return body;
}

/** Yields {event, data} from a text/event-stream response body. */
async function* serverSentEvents(response) {
  if (!response.ok) throw await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = 'message';
      let data = '';
      for (const line of block.split('\n')) {
        if (line.startsWith('event: ')) event = line.slice(7);
        else if (line.startsWith('data: ')) data += line.slice(6);
      }
      yield { event, data: data ? JSON.parse(data) : null };
    }
  }
}

const clock = (s) => {
  const m = Math.floor(s / 60);
  return `${String(m).padStart(2, '0')}:${(s - m * 60).toFixed(2).padStart(5, '0')}`;
};

// --- models ------------------------------------------------------------------------------

async function loadModels() {
  try {
    const { models } = await jsonOrError(await fetch('/api/models'));
    for (const select of document.querySelectorAll('select[data-task]')) {
      for (const m of models.filter((x) => x.task === select.dataset.task && x.state === 'MODEL_STATE_READY')) {
        const option = new Option(`${m.name}${m.is_default ? ' (default)' : ''}`, m.name);
        select.add(option);
      }
    }
    setStatus('server-status', `connected: ${models.length} model(s) loaded`);
  } catch (error) {
    setStatus('server-status', `the gRPC server is not reachable: ${describeError(error)}`, true);
  }
}

// --- image classification ------------------------------------------------------------------

$('image-file').addEventListener('change', () => {
  const file = $('image-file').files[0];
  const preview = $('image-preview');
  if (file) {
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  }
});

$('image-run').addEventListener('click', async () => {
  const file = $('image-file').files[0];
  if (!file) return setStatus('image-status', 'choose an image first', true);
  const params = new URLSearchParams({ model: $('image-model').value, top_k: $('image-top-k').value });
  setStatus('image-status', 'classifying…');
  const table = $('image-result');
  const body = table.tBodies[0];
  body.replaceChildren();
  table.hidden = true;
  try {
    const result = await jsonOrError(await fetch(`/api/classify-image?${params}`, { method: 'POST', body: file }));
    for (const { label, score = 0 } of result.labels ?? []) {
      const row = body.insertRow();
      row.insertCell().textContent = label;
      row.insertCell().textContent = score.toFixed(4);
      const bar = document.createElement('div');
      bar.className = 'bar';
      bar.style.width = `${Math.max(2, Math.round(score * 200))}px`;
      row.insertCell().append(bar);
    }
    table.hidden = false;
    setStatus('image-status', `done in ${(result.run?.compute_ms ?? 0).toFixed(1)} ms on ${result.run?.device ?? '?'}`);
  } catch (error) {
    setStatus('image-status', describeError(error), true);
  }
  return undefined;
});

// --- speech recognition --------------------------------------------------------------------

function asrOptions() {
  const options = { model: $('asr-model').value, timestamps: $('asr-timestamps').value };
  if ($('asr-chunk').value) options.chunk_length_s = $('asr-chunk').value;
  return options;
}

/** Shows a segment; one with the id of a shown segment replaces it (interim -> final). In a
 * live stream every interim decode resends all interim segments, so interim items from an
 * earlier decode (an older audio_received_s) that this one did not resend are dropped. */
function showSegment(data) {
  const list = $('asr-segments');
  const id = data.id ?? String(list.children.length);
  if (!data.is_final && data.audio_received_s !== undefined) {
    for (const stale of list.querySelectorAll('li.interim')) {
      if (stale.dataset.id !== id && Number(stale.dataset.received) < data.audio_received_s) stale.remove();
    }
  }
  let item = list.querySelector(`li[data-id="${CSS.escape(id)}"]`);
  if (!item) {
    item = document.createElement('li');
    item.dataset.id = id;
    list.append(item);
  }
  item.dataset.received = data.audio_received_s ?? 0;
  item.classList.toggle('interim', !data.is_final);
  const end = data.end_s === undefined ? '…' : clock(data.end_s);
  const time = document.createElement('span');
  time.className = 'time';
  time.textContent = `[${clock(data.start_s ?? 0)} → ${end}]`;
  item.replaceChildren(time, document.createTextNode(` ${(data.text ?? '').trim()}`));
}

function showDone(data) {
  // Everything is final now: an interim the last decode left behind is no longer meant.
  $('asr-segments').querySelectorAll('li.interim').forEach((item) => item.remove());
  const t = data.transcription ?? {};
  $('asr-transcript').textContent = (t.text ?? '').trim();
  setStatus('asr-status', `done: ${(t.duration_s ?? 0).toFixed(1)} s of audio${t.language ? `, language ${t.language}` : ''}`);
}

function clearTranscript() {
  $('asr-segments').replaceChildren();
  $('asr-transcript').textContent = '';
}

async function transcribe(blob) {
  clearTranscript();
  setStatus('asr-status', 'uploading…');
  const params = new URLSearchParams(asrOptions());
  try {
    const response = await fetch(`/api/transcribe?${params}`, { method: 'POST', body: blob });
    for await (const { event, data } of serverSentEvents(response)) {
      if (event === 'segment') {
        showSegment(data);
        setStatus('asr-status', `transcribing… ${clock(data.end_s ?? data.start_s ?? 0)}`);
      } else if (event === 'done') {
        showDone(data);
      } else if (event === 'error') {
        setStatus('asr-status', describeError(data), true);
      }
    }
  } catch (error) {
    setStatus('asr-status', describeError(error), true);
  }
}

$('asr-run').addEventListener('click', () => {
  const file = $('asr-file').files[0];
  if (!file) return setStatus('asr-status', 'choose an audio file first', true);
  return transcribe(file);
});

// --- live microphone -------------------------------------------------------------------------
// Audio goes to the bridge over a WebSocket as it is captured (mono float32, ~0.1 s per
// message); the bridge relays it to StreamingTranscribe and sends back interim and final
// segments (protocol: clients/web/live_session.py).

const LIVE_CHUNK_S = 0.1;
// Unsent audio the socket may hold (~16 s at 16 kHz) before the page gives up: the network or
// the bridge is not keeping up, and a transcript that far behind is no longer live.
const LIVE_MAX_BUFFERED_BYTES = 1 << 20;

function microphoneError(error) {
  if (error.name === 'NotAllowedError' || error.name === 'SecurityError') {
    return 'microphone access was denied: allow it for this page in the browser, then try again';
  }
  if (error.name === 'NotFoundError') return 'no microphone was found';
  return `cannot use the microphone: ${error.message}`;
}

/** Starts capturing; onSamples(Float32Array, rate) gets mono samples as they are captured. */
async function startCapture(onSamples) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw Object.assign(new Error('this page must be opened over https or on localhost to use the microphone'),
      { name: 'SecurityError' });
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  let context;
  let source;
  try {
    // The model's rate: the browser resamples, and a third of the audio crosses the network.
    context = new AudioContext({ sampleRate: 16000 });
    source = context.createMediaStreamSource(stream);
  } catch {
    // Some browsers cannot connect a microphone to a context at another rate: send the
    // device's rate and let the server resample.
    await context?.close();
    context = new AudioContext();
    source = context.createMediaStreamSource(stream);
  }
  let node;
  if (context.audioWorklet) {
    await context.audioWorklet.addModule('/capture-worklet.js');
    node = new AudioWorkletNode(context, 'pipeserve-capture');
    node.port.onmessage = (event) => onSamples(event.data, context.sampleRate);
  } else { // older browsers
    node = context.createScriptProcessor(4096, 1, 1);
    node.onaudioprocess = (event) => {
      onSamples(new Float32Array(event.inputBuffer.getChannelData(0)), context.sampleRate);
    };
  }
  source.connect(node);
  node.connect(context.destination); // outputs silence; a processing node runs only when connected
  const stop = async () => {
    source.disconnect();
    node.disconnect();
    stream.getTracks().forEach((track) => track.stop());
    await context.close();
  };
  return { rate: context.sampleRate, stop };
}

let live = null;

function setLiveButton(state) {
  const button = $('asr-record');
  button.textContent = { idle: '● Live from microphone', recording: '■ Stop', finishing: 'finishing…' }[state];
  button.classList.toggle('recording', state === 'recording');
  button.disabled = state === 'finishing';
}

async function startLive() {
  clearTranscript();
  setStatus('asr-status', 'starting the microphone…');
  const session = { pending: [], pendingLength: 0, sent: 0, finished: false, failed: false };
  live = session;
  setLiveButton('finishing');
  try {
    session.capture = await startCapture((samples, rate) => queueSamples(session, samples, rate));
  } catch (error) {
    live = null;
    setLiveButton('idle');
    setStatus('asr-status', microphoneError(error), true);
    return;
  }
  const params = new URLSearchParams({ ...asrOptions(), rate: session.capture.rate });
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const socket = new WebSocket(`${scheme}://${location.host}/api/live?${params}`);
  socket.binaryType = 'arraybuffer';
  session.socket = socket;
  socket.onopen = () => {
    session.opened = true;
    setLiveButton('recording');
    setStatus('asr-status', 'listening…');
    flushSamples(session);
  };
  socket.onmessage = (message) => {
    const { event, data } = JSON.parse(message.data);
    if (event === 'segment') {
      showSegment(data);
      if (!session.stopping) setStatus('asr-status', `listening… ${data.audio_received_s.toFixed(1)} s heard`);
    } else if (event === 'stopped') {
      setStatus('asr-status', `${data.message}; finishing…`);
      endCapture(session);
    } else if (event === 'done') {
      session.finished = true;
      showDone(data);
    } else if (event === 'error') {
      session.failed = true;
      setStatus('asr-status', describeError(data), true);
    }
  };
  socket.onclose = (event) => {
    endCapture(session);
    if (!session.finished && !session.failed) {
      setStatus('asr-status', !session.opened
        ? 'the demo server is not reachable (is demo.py running?)'
        : `the live session ended before its transcription (connection closed, code ${event.code}`
          + `${event.reason ? `: ${event.reason}` : ''})`, true);
    }
    if (live === session) live = null;
    setLiveButton('idle');
  };
}

function queueSamples(session, samples, rate) {
  if (session.stopSent) return; // blocks still in flight when the capture stopped
  session.pending.push(samples);
  session.pendingLength += samples.length;
  // Before the socket opens (capture starts first, so a permission prompt cannot run into the
  // bridge's idle timeout) samples wait here and go in the first message.
  if (session.pendingLength >= LIVE_CHUNK_S * rate) flushSamples(session);
}

/** Sends the samples captured so far as one message, once the socket is open. */
function flushSamples(session) {
  const { socket } = session;
  if (!socket || socket.readyState !== WebSocket.OPEN || !session.pendingLength) return;
  if (socket.bufferedAmount > LIVE_MAX_BUFFERED_BYTES) {
    session.failed = true;
    setStatus('asr-status', 'the connection to the demo server cannot keep up with the microphone', true);
    endCapture(session);
    socket.close(1000);
    return;
  }
  const chunk = new Float32Array(session.pendingLength);
  let offset = 0;
  for (const part of session.pending) { chunk.set(part, offset); offset += part.length; }
  session.pending = [];
  session.pendingLength = 0;
  socket.send(chunk.buffer);
  session.sent += chunk.length;
}

async function endCapture(session) {
  if (session.captureEnded) return;
  session.captureEnded = true;
  await session.capture?.stop().catch(() => {});
}

async function stopLive(session) {
  session.stopping = true;
  setLiveButton('finishing');
  setStatus('asr-status', 'finishing…');
  await endCapture(session);
  flushSamples(session);
  session.stopSent = true;
  if (session.socket.readyState === WebSocket.OPEN) session.socket.send(JSON.stringify({ type: 'stop' }));
}

$('asr-record').addEventListener('click', () => {
  if (!live) return startLive();
  if (live.socket?.readyState === WebSocket.OPEN && !live.stopping) return stopLive(live);
  return undefined;
});

// --- text generation -----------------------------------------------------------------------

let generation = null;
$('gen-run').addEventListener('click', async () => {
  const prompt = $('gen-prompt').value;
  $('gen-prompt-echo').textContent = prompt;
  $('gen-text').textContent = '';
  setStatus('gen-status', 'generating…');
  generation = new AbortController();
  $('gen-run').disabled = true;
  $('gen-stop').disabled = false;
  let tokens = 0;
  try {
    const response = await fetch('/api/generate', {
      method: 'POST', signal: generation.signal, headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ prompt, model: $('gen-model').value, max_new_tokens: Number($('gen-max').value),
        do_sample: $('gen-sample').checked }),
    });
    for await (const { event, data } of serverSentEvents(response)) {
      if (event === 'token' && data.sequence_index === 0) {
        $('gen-text').textContent += data.text;
        tokens += 1;
        setStatus('gen-status', `generating… ${tokens} tokens`);
      } else if (event === 'done' && data.sequence_index === 0) {
        setStatus('gen-status', `done: ${data.generated_tokens ?? tokens} tokens (${(data.finish_reason ?? '').replace('FINISH_REASON_', '').toLowerCase()})`);
      } else if (event === 'error') {
        setStatus('gen-status', describeError(data), true);
      }
    }
  } catch (error) {
    if (error.name === 'AbortError') setStatus('gen-status', `stopped after ${tokens} tokens`);
    else setStatus('gen-status', describeError(error), true);
  } finally {
    $('gen-run').disabled = false;
    $('gen-stop').disabled = true;
  }
});
$('gen-stop').addEventListener('click', () => generation?.abort());

loadModels();
