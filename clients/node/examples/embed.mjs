// Sentence embedding: node examples/embed.mjs "The quick brown fox" [model]
import { PipeserveClient } from '../src/index.js';

const [text, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  const response = await client.extractFeatures(text, { model, pooling: 'mean', normalize: true });
  const values = response.sentence_embedding.values;
  console.log(`${response.dimensions} dimensions: [${values.slice(0, 5).map((v) => v.toFixed(4)).join(', ')}, ...]`);
} finally {
  client.close();
}
