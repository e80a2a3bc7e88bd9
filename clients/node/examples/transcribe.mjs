// Transcribe an audio file, printing segments as they are decoded:
//   node examples/transcribe.mjs talk.wav [model]
import { PipeserveClient } from '../src/index.js';

const [file, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
const clock = (s) => `${Math.floor(s / 60)}:${(s % 60).toFixed(2).padStart(5, '0')}`;
try {
  for await (const message of client.transcribeStream(file, { model, returnTimestamps: true })) {
    if (message.segment?.is_final) {
      const { start_s: start, end_s: end, text } = message.segment;
      console.log(`[${clock(start)} -> ${end === undefined ? '...' : clock(end)}] ${text.trim()}`);
    } else if (message.done) {
      console.log(`language: ${message.done.transcription.language || '?'}, ${message.done.transcription.duration_s.toFixed(1)}s`);
    }
  }
} finally {
  client.close();
}
