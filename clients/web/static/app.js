// The demo page: uploads go to the HTTP bridge (demo.py), which calls the gRPC service;
// streams come back as Server-Sent Events read with fetch().

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

async function transcribe(blob) {
  const list = $('asr-segments');
  list.replaceChildren();
  $('asr-transcript').textContent = '';
  setStatus('asr-status', 'uploading…');
  const params = new URLSearchParams({ model: $('asr-model').value, timestamps: $('asr-timestamps').value });
  try {
    const response = await fetch(`/api/transcribe?${params}`, { method: 'POST', body: blob });
    let count = 0;
    for await (const { event, data } of serverSentEvents(response)) {
      if (event === 'segment') {
        // A later segment with the same id replaces an interim one.
        let item = list.querySelector(`li[data-id="${CSS.escape(data.id ?? String(count))}"]`);
        if (!item) {
          item = document.createElement('li');
          item.dataset.id = data.id ?? String(count);
          list.append(item);
          count += 1;
        }
        item.classList.toggle('interim', !data.is_final);
        const end = data.end_s === undefined ? '…' : clock(data.end_s);
        item.innerHTML = '';
        const time = document.createElement('span');
        time.className = 'time';
        time.textContent = `[${clock(data.start_s ?? 0)} → ${end}]`;
        item.append(time, document.createTextNode(` ${(data.text ?? '').trim()}`));
        setStatus('asr-status', `transcribing… ${clock(data.end_s ?? data.start_s ?? 0)}`);
      } else if (event === 'done') {
        const t = data.transcription ?? {};
        $('asr-transcript').textContent = (t.text ?? '').trim();
        setStatus('asr-status', `done: ${(t.duration_s ?? 0).toFixed(1)} s of audio${t.language ? `, language ${t.language}` : ''}`);
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

/** 16-bit PCM WAV from mono float samples (what any server-side decoder reads). */
function wav(samples, rate) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => [...s].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, 'RIFF'); view.setUint32(4, 36 + samples.length * 2, true); text(8, 'WAVE');
  text(12, 'fmt '); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true); view.setUint16(34, 16, true);
  text(36, 'data'); view.setUint32(40, samples.length * 2, true);
  samples.forEach((v, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, v)) * 0x7fff, true));
  return new Blob([buffer], { type: 'audio/wav' });
}

let recording = null;
$('asr-record').addEventListener('click', async () => {
  const button = $('asr-record');
  if (recording) {
    const { stream, context, processor, chunks } = recording;
    recording = null;
    processor.disconnect();
    stream.getTracks().forEach((track) => track.stop());
    await context.close();
    button.textContent = '● Record';
    button.classList.remove('recording');
    const samples = new Float32Array(chunks.reduce((n, c) => n + c.length, 0));
    let offset = 0;
    for (const chunk of chunks) { samples.set(chunk, offset); offset += chunk.length; }
    return transcribe(wav(samples, context.sampleRate));
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const context = new AudioContext();
    const source = context.createMediaStreamSource(stream);
    const processor = context.createScriptProcessor(4096, 1, 1);
    const chunks = [];
    processor.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
    source.connect(processor);
    processor.connect(context.destination);
    recording = { stream, context, processor, chunks };
    button.textContent = '■ Stop and transcribe';
    button.classList.add('recording');
    setStatus('asr-status', 'recording…');
  } catch (error) {
    setStatus('asr-status', `cannot record: ${error.message}`, true);
  }
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
