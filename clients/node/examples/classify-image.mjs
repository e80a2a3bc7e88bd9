// Classify an image: node examples/classify-image.mjs cat.jpg [model]
import { run } from './run.mjs';

await run('node examples/classify-image.mjs IMAGE [MODEL]', 1, async (client, [file, model = '']) => {
  const { labels } = await client.classifyImage(file, { model, topK: 3 });
  for (const { label, score } of labels) console.log(`${label}\t${score.toFixed(4)}`);
});
