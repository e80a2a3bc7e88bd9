// Score a text against labels you choose:
//   node examples/zero-shot.mjs "The match ended 2-1" "sports,politics,cooking" [model]
import { PipeserveClient } from '../src/index.js';

const [text, labels, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  const response = await client.zeroShot(text, labels, { model });
  for (const { label, score } of response.labels) console.log(`${label}\t${score.toFixed(4)}`);
} finally {
  client.close();
}
