// Score a text against labels you choose:
//   node examples/zero-shot.mjs "The match ended 2-1" "sports,politics,cooking" [model]
import { run } from './run.mjs';

await run('node examples/zero-shot.mjs TEXT LABELS [MODEL]', 2, async (client, [text, labels, model = '']) => {
  const response = await client.zeroShot(text, labels, { model });
  for (const { label, score } of response.labels) console.log(`${label}\t${score.toFixed(4)}`);
});
