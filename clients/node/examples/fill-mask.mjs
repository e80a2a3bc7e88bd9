// Fill the mask: node examples/fill-mask.mjs "Paris is the [MASK] of France." [model]
import { PipeserveClient } from '../src/index.js';

const [text, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  const { masks } = await client.fillMask(text, { model, topK: 5 });
  for (const { candidates } of masks) {
    for (const c of candidates) console.log(`${c.token_str}\t${c.score.toFixed(4)}\t${c.sequence}`);
  }
} finally {
  client.close();
}
