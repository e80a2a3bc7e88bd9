// Transcribe an audio file, printing segments as they are decoded:
//   node examples/transcribe.mjs talk.wav [model]
import { run } from './run.mjs';

/** @param {number} s */
const clock = (s) => `${Math.floor(s / 60)}:${(s % 60).toFixed(2).padStart(5, '0')}`;

await run('node examples/transcribe.mjs AUDIO [MODEL]', 1, async (client, [file, model = '']) => {
  for await (const message of client.transcribeStream(file, { model, returnTimestamps: true })) {
    if (message.segment?.is_final) {
      const { start_s: start, end_s: end, text } = message.segment;
      console.log(`[${clock(start)} -> ${end === undefined ? '...' : clock(end)}] ${text.trim()}`);
    } else if (message.done) {
      const { transcription } = message.done;
      console.log(`language: ${transcription?.language || '?'}, ${(transcription?.duration_s ?? 0).toFixed(1)}s`);
    }
  }
});
