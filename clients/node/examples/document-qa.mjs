// Ask a question about a document image (the server runs OCR):
//   node examples/document-qa.mjs invoice.png "What is the total?" [model]
import { PipeserveClient } from '../src/index.js';

const [file, question, model = ''] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  const { answers } = await client.documentQa(file, question, { model, topK: 3 });
  for (const a of answers) console.log(`${a.answer}\t${a.score.toFixed(4)}`);
} finally {
  client.close();
}
