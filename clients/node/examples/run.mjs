// What every example shares: its arguments checked, a client for $PIPESERVE_SERVER, and
// failures reported as one line with the server's reason and an exit code (2 usage, 1 any
// other failure) instead of a stack trace.
import { InputError, PipeserveClient, PipeserveError, UnavailableError } from '../src/index.js';

/**
 * @param {string} usage  the example's command line, shown when arguments are missing
 * @param {number} required  how many arguments it needs
 * @param {(client: PipeserveClient, args: string[]) => Promise<void>} body
 */
export async function run(usage, required, body) {
  const args = process.argv.slice(2);
  if (args.length < required) {
    console.error(`usage: ${usage}`);
    process.exitCode = 2;
    return;
  }
  const client = new PipeserveClient(process.env.PIPESERVE_SERVER ?? '127.0.0.1:50051');
  try {
    await body(client, args);
  } catch (error) {
    process.exitCode = 1;
    console.error(`error: ${describe(error, client.target)}`);
  } finally {
    client.close();
  }
}

/**
 * @param {unknown} error
 * @param {string} target
 */
function describe(error, target) {
  if (error instanceof InputError) return error.message;
  if (error instanceof UnavailableError) {
    return `cannot reach the pipeserve server at ${target} (${error.message}); is it running? `
      + 'Set PIPESERVE_SERVER=host:port to use another.';
  }
  if (error instanceof PipeserveError) {
    return `${error.message} [${[error.codeName, error.reason].filter(Boolean).join(' ')}]`;
  }
  return error instanceof Error ? error.message : String(error);
}
