"""The published shape of the Node client: `npm pack` builds @pipeserve/client (types generated
from the protos, an ES module and a CommonJS build), and the tarball, installed into a temporary
ES-module project and a temporary CommonJS project with `typescript`, compiles a consumer under
`strict` (the package's own .d.ts files checked too: no skipLibCheck) that then runs against a
live server. The types are real: a consumer passing a wrong argument type fails to compile, and
`@ts-expect-error` lines in the good consumer would fail as unused if the types were `any`."""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from client_models import loader_fixture, require_servicer

NODE_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"

loaded = loader_fixture()

CONSUMER = """\
import { NotFoundError, PipeserveClient } from '@pipeserve/client';
import type { ClassifyTextResponse, FinishReason, ModelInfo, Segment } from '@pipeserve/client';

async function main(): Promise<void> {
  const [address, model] = process.argv.slice(2);
  const client = new PipeserveClient(address, { timeoutMs: 120_000, maxConcurrency: 2 });
  try {
    const models: ModelInfo[] = await client.models.list();
    const one: ClassifyTextResponse = await client.classifyText('I love it', { model, topK: 2 });
    const many: ClassifyTextResponse[] = await client.classifyText(['I love it', 'I hate it', 'So so'], { model, topK: 1 });
    let reason = '';
    try {
      await client.classifyText('x', { model: 'never-loaded' });
    } catch (error) {
      if (error instanceof NotFoundError) reason = error.reason;
    }
    const finish: FinishReason = 'FINISH_REASON_LENGTH';
    const segment: Pick<Segment, 'start_s' | 'end_s'> = { start_s: 0 };
    console.log(JSON.stringify({
      format: typeof require === 'function' ? 'commonjs' : 'module',
      models: models.map((m) => m.name),
      one: one.labels.map((l) => l.label),
      many: many.map((r) => r.labels[0].label),
      reason, finish, segment,
    }));
  } finally {
    client.close();
  }
}

// Type checks only (never called): each line must be an error, or tsc fails on the unused directive.
export async function misuses(client: PipeserveClient, one: ClassifyTextResponse): Promise<void> {
  // @ts-expect-error: a score is a number
  one.labels[0].score.toUpperCase();
  // @ts-expect-error: an array of texts resolves to an array of responses
  (await client.classifyText(['a'])).labels;
  // @ts-expect-error: not a FinishReason
  const wrongFinish: FinishReason = 'FINISHED';
  for await (const message of client.transcribeStream('a.wav')) {
    // @ts-expect-error: a oneof member may be absent
    console.log(message.segment.text);
  }
  console.log(wrongFinish);
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
"""

# Wrong calls the types must refuse.
WRONG_CALLS = {
    "a number as the text": "client.classifyText(42);",
    "an option of the wrong type": "client.classifyText('a', { topK: 'two' });",
    "an unknown option": "client.classifyText('a', { top_k: 2 });",
    "an array where one input is taken": "client.transcribeStream(['a.wav', 'b.wav']);",
}


def _run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _version(package: str) -> str:
    return json.loads((NODE_DIR / "node_modules" / package / "package.json").read_text())["version"]


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """(root, {"module": dir, "commonjs": dir}): the packed tarball installed once in root,
    which both projects resolve packages from."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are required (Debian: apt-get install nodejs npm; Node >= 18)")
    root = tmp_path_factory.mktemp("node_package")
    packed = _run(["npm", "pack", "--silent", "--pack-destination", str(root)], NODE_DIR)
    assert packed.returncode == 0, f"npm pack failed:\n{packed.stdout}\n{packed.stderr}"
    tarball = root / packed.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as archive:
        shipped = set(archive.getnames())
    for needed in ("package/dist/types/index.d.ts", "package/dist/types/messages.d.ts", "package/dist/cjs/index.js",
                   "package/dist/cjs/index.d.ts", "package/src/index.js", "package/protos/pipeserve/v1/model.proto"):
        assert needed in shipped, f"{needed} missing from the tarball"
    (root / "package.json").write_text(json.dumps({"name": "consumers", "private": True}))
    installed = _run(["npm", "install", "--no-audit", "--no-fund", "--prefer-offline", str(tarball),
                      f"typescript@{_version('typescript')}", f"@types/node@{_version('@types/node')}"], root)
    assert installed.returncode == 0, f"npm install failed:\n{installed.stdout}\n{installed.stderr}"
    directories = {}
    for kind in ("module", "commonjs"):
        directory = root / kind
        directory.mkdir()
        (directory / "package.json").write_text(json.dumps({"name": f"consumer-{kind}", "private": True,
                                                             "type": kind}))
        directories[kind] = directory
    return root, directories


def _compile(root: Path, directory: Path, source: str) -> subprocess.CompletedProcess:
    (directory / "consumer.ts").write_text(source)
    (directory / "tsconfig.json").write_text(json.dumps({"compilerOptions": {
        "strict": True, "module": "nodenext", "moduleResolution": "nodenext", "target": "es2022",
        "outDir": "dist", "types": ["node"], "noEmitOnError": True, "skipLibCheck": False,
    }, "files": ["consumer.ts"]}))
    return _run([str(root / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"], directory, timeout=300)


@pytest.mark.parametrize("kind", ["module", "commonjs"])
def test_strict_typescript_consumer_compiles_and_runs(projects, kind, grpc_server, loaded):
    require_servicer("text_classification")
    model = loaded("sequence_classification")
    root, directories = projects
    compiled = _compile(root, directories[kind], CONSUMER)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    ran = _run(["node", str(directories[kind] / "dist" / "consumer.js"), grpc_server.address, model],
               directories[kind], timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result["format"] == kind
    assert model in result["models"]
    assert len(result["one"]) == 2 and len(result["many"]) == 3
    assert result["reason"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize("kind", ["module", "commonjs"])
def test_a_wrong_argument_type_does_not_compile(projects, kind):
    """One file, one wrong call per line: each line must have its own error."""
    root, directories = projects
    header = ["import { PipeserveClient } from '@pipeserve/client';",
              "const client = new PipeserveClient('127.0.0.1:1');"]
    compiled = _compile(root, directories[kind], "\n".join(header + list(WRONG_CALLS.values())) + "\n")
    assert compiled.returncode != 0
    lines_with_errors = {int(line.split("(")[1].split(",")[0]) for line in compiled.stdout.splitlines()
                         if line.startswith("consumer.ts(") and "error TS" in line}
    for number, wrong in enumerate(WRONG_CALLS, start=len(header) + 1):
        assert number in lines_with_errors, f"{wrong} compiled:\n{compiled.stdout}"
    assert lines_with_errors <= set(range(len(header) + 1, len(header) + 1 + len(WRONG_CALLS))), compiled.stdout
