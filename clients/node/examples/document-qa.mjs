// Ask a question about a document image (the server runs OCR):
//   node examples/document-qa.mjs invoice.png "What is the total?" [model]
import { run } from './run.mjs';

await run('node examples/document-qa.mjs IMAGE QUESTION [MODEL]', 2, async (client, [file, question, model = '']) => {
  const { answers } = await client.documentQa(file, question, { model, topK: 3 });
  for (const a of answers) console.log(`${a.answer}\t${a.score.toFixed(4)}`);
});
