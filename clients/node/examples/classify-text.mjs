// Classify texts (sentiment, topic...): node examples/classify-text.mjs "I love it" ["I hate it" ...] [--model NAME]
// Several texts make one call each (at most maxConcurrency at a time); the responses come back in order.
import { run } from './run.mjs';

await run('node examples/classify-text.mjs TEXT [TEXT ...] [--model NAME]', 1, async (client, args) => {
  const at = args.indexOf('--model');
  const model = at >= 0 ? args[at + 1] ?? '' : '';
  const texts = at >= 0 ? args.slice(0, at) : args;
  const responses = await client.classifyText(texts, { model, topK: 2 });
  responses.forEach(({ labels }, i) => {
    console.log(texts[i]);
    for (const { label, score } of labels) console.log(`  ${label}\t${score.toFixed(4)}`);
  });
});
