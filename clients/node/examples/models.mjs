// List the server's models, or load / unload one.
//   node examples/models.mjs                      list
//   node examples/models.mjs load ./my-model      load a local directory (or a Hub id in the cache)
//   node examples/models.mjs unload ./my-model
import { run } from './run.mjs';

await run('node examples/models.mjs [list | load NAME | unload NAME]', 0, async (client, [verb = 'list', name]) => {
  if (verb === 'list') {
    for (const m of await client.models.list()) {
      console.log(`${m.name}\t${m.task}\t${m.state}\t${m.family}\t${m.device}`);
    }
  } else if ((verb === 'load' || verb === 'unload') && name) {
    const info = verb === 'load' ? await client.models.load(name, { timeoutMs: 600_000 }) : await client.models.unload(name);
    console.log(`${verb}ed ${info.name} (${info.task}, ${info.family})`);
  } else {
    console.error('usage: node examples/models.mjs [list | load NAME | unload NAME]');
    process.exitCode = 2;
  }
});
