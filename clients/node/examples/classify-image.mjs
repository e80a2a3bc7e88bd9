// Classify an image: node examples/classify-image.mjs cat.jpg [model]
import { PipeserveClient } from '../src/index.js';

const [file, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  const { labels } = await client.classifyImage(file, { model, topK: 3 });
  for (const { label, score } of labels) console.log(`${label}\t${score.toFixed(4)}`);
} finally {
  client.close();
}
