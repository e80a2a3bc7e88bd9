// Named entities: node examples/ner.mjs "My name is Wolfgang and I live in Berlin" [model]
import { PipeserveClient } from '../src/index.js';

const [text, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  const { entities } = await client.classifyTokens(text, { model, aggregationStrategy: 'simple' });
  for (const e of entities) console.log(`${e.entity}\t${e.word}\t[${e.start}:${e.end}]\t${e.score.toFixed(4)}`);
} finally {
  client.close();
}
