// Extractive question answering:
//   node examples/qa.mjs "Where do I live?" "My name is Wolfgang and I live in Berlin" [model]
import { run } from './run.mjs';

await run('node examples/qa.mjs QUESTION CONTEXT [MODEL]', 2, async (client, [question, context, model = '']) => {
  const { answers } = await client.answerQuestion(question, context, { model });
  for (const a of answers) console.log(`${a.answer}\t${a.score.toFixed(4)}\t[${a.start}:${a.end}]`);
});
