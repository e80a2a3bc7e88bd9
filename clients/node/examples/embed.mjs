// Sentence embedding: node examples/embed.mjs "The quick brown fox" [model]
import { run } from './run.mjs';

await run('node examples/embed.mjs TEXT [MODEL]', 1, async (client, [text, model = '']) => {
  const response = await client.extractFeatures(text, { model, pooling: 'mean', normalize: true });
  const values = response.sentence_embedding?.values ?? [];
  console.log(`${response.dimensions} dimensions: [${values.slice(0, 5).map((v) => v.toFixed(4)).join(', ')}, ...]`);
});
