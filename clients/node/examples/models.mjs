// List the server's models, or load / unload one.
//   node examples/models.mjs                      list
//   node examples/models.mjs load ./my-model      load a local directory (or a Hub id in the cache)
//   node examples/models.mjs unload ./my-model
import { PipeserveClient } from '../src/index.js';

const [verb = 'list', name] = process.argv.slice(2);
const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
try {
  if (verb === 'list') {
    for (const m of await client.models.list()) {
      console.log(`${m.name}\t${m.task}\t${m.state}\t${m.family}\t${m.device}`);
    }
  } else if (verb === 'load') {
    const info = await client.models.load(name, { timeoutMs: 600_000 });
    console.log(`loaded ${info.name} (${info.task}, ${info.family})`);
  } else if (verb === 'unload') {
    console.log(`unloaded ${(await client.models.unload(name)).name}`);
  }
} finally {
  client.close();
}
