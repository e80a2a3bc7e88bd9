// Fill the mask: node examples/fill-mask.mjs "Paris is the [MASK] of France." [model]
import { run } from './run.mjs';

await run('node examples/fill-mask.mjs TEXT [MODEL]', 1, async (client, [text, model = '']) => {
  const { masks } = await client.fillMask(text, { model, topK: 5 });
  for (const { candidates } of masks) {
    for (const c of candidates) console.log(`${c.token_str}\t${c.score.toFixed(4)}\t${c.sequence}`);
  }
});
