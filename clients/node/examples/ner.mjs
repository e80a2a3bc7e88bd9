// Named entities: node examples/ner.mjs "My name is Wolfgang and I live in Berlin" [model]
import { run } from './run.mjs';

await run('node examples/ner.mjs TEXT [MODEL]', 1, async (client, [text, model = '']) => {
  const { entities } = await client.classifyTokens(text, { model, aggregationStrategy: 'simple' });
  for (const e of entities) console.log(`${e.entity}\t${e.word}\t[${e.start}:${e.end}]\t${e.score.toFixed(4)}`);
});
