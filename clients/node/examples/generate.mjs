// Generate text, printing tokens as they arrive: node examples/generate.mjs "Once upon a time" [model]
import { PipeserveClient } from '../src/index.js';

const [prompt, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  for await (const message of client.generateStream(prompt, { model, maxNewTokens: 30 })) {
    if (message.token) process.stdout.write(message.token.text);
    if (message.done) process.stdout.write(`\n[${message.done.finish_reason}, ${message.done.generated_tokens} tokens]\n`);
  }
} finally {
  client.close();
}
