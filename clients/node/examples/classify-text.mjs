// Classify a text (sentiment, topic...): node examples/classify-text.mjs "I love it" [model]
import { PipeserveClient } from '../src/index.js';

const [text, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  const { labels } = await client.classifyText(text, { model, topK: 2 });
  for (const { label, score } of labels) console.log(`${label}\t${score.toFixed(4)}`);
} finally {
  client.close();
}
