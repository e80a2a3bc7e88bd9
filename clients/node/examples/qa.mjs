// Extractive question answering:
//   node examples/qa.mjs "Where do I live?" "My name is Wolfgang and I live in Berlin" [model]
import { PipeserveClient } from '../src/index.js';

const [question, context, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  const { answers } = await client.answerQuestion(question, context, { model });
  for (const a of answers) console.log(`${a.answer}\t${a.score.toFixed(4)}\t[${a.start}:${a.end}]`);
} finally {
  client.close();
}
