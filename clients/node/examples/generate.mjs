// Generate text, printing tokens as they arrive: node examples/generate.mjs "Once upon a time" [model]
import { run } from './run.mjs';

await run('node examples/generate.mjs PROMPT [MODEL]', 1, async (client, [prompt, model = '']) => {
  for await (const message of client.generateStream(prompt, { model, maxNewTokens: 30 })) {
    if (message.token) process.stdout.write(message.token.text);
    if (message.done) process.stdout.write(`\n[${message.done.finish_reason}, ${message.done.generated_tokens} tokens]\n`);
  }
});
