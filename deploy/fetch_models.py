#!/usr/bin/env python3
"""Fills the model volume: downloads each model of a list from the Hugging Face Hub into its
own folder under DEST (the deploy/k8s Job runs it as `pipeserve-fetch-models` into the models
PVC; it works the same on any machine with huggingface_hub installed).

The list has one model per line, `REPO_ID[@REVISION] [FOLDER]` (FOLDER defaults to the
repository's name; `#` starts a comment), e.g.

    google/vit-base-patch16-224@main vit-base-patch16-224

Only what pipeserve loads is fetched (configs, safetensors, tokenizer files, CTranslate2
model.bin, GGUF), never pickled .bin/.pt weights. A folder is written beside its final place
and renamed into it when complete, with a `.pipeserve-source` file naming what it holds, so a
crashed Job never leaves a half model where a server would load it, and a rerun skips the
models already there (a changed revision is fetched again)."""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

# What the loaders read (pipeserve.checkpoints): no pickles, no framework duplicates.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.gguf", "model.bin",
                  "tokenizer*", "merges.txt", "vocab.*"]
SOURCE_FILE = ".pipeserve-source"
# Hub ids: "name" or "owner/name" of letters, digits, "-", "_", "." (no "..", no leading "-").
REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
REVISION = re.compile(r"[\w.-]{1,128}")
FOLDER = re.compile(r"[A-Za-z0-9][\w.-]{0,127}")


class ListError(ValueError):
    pass


def parse_list(text: str) -> list[tuple[str, str | None, str]]:
    """[(repo_id, revision or None, folder)] from the list's text; ListError names a bad line."""
    models, folders = [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ListError(f"line {number}: expected 'REPO_ID[@REVISION] [FOLDER]', got {line!r}")
        repo_id, _, revision = parts[0].partition("@")
        folder = parts[1] if len(parts) == 2 else repo_id.rsplit("/", 1)[-1]
        if not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
            raise ListError(f"line {number}: {repo_id!r} is not a Hub repository id")
        if revision and not REVISION.fullmatch(revision):
            raise ListError(f"line {number}: {revision!r} is not a revision")
        if not FOLDER.fullmatch(folder) or ".." in folder:
            raise ListError(f"line {number}: folder {folder!r} must be one plain name (no '/', no '..')")
        if folder in folders:
            raise ListError(f"line {number}: folder {folder!r} is used twice")
        folders.add(folder)
        models.append((repo_id, revision or None, folder))
    return models


def fetch(repo_id: str, revision: str | None, folder: Path) -> bool:
    """Downloads one model into `folder` unless it already holds it; True if it downloaded."""
    from huggingface_hub import snapshot_download

    source = f"{repo_id}@{revision or 'main'}"
    marker = folder / SOURCE_FILE
    if marker.is_file() and marker.read_text().strip() == source:
        return False
    partial = folder.with_name(f".partial-{folder.name}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        snapshot_download(repo_id, revision=revision, local_dir=str(partial), allow_patterns=ALLOW_PATTERNS)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a retry starts clean; nothing half-written stays
        raise
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
    (partial / SOURCE_FILE).write_text(source + "\n")
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(folder)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", required=True, type=Path, help="the model list (one REPO_ID[@REV] [FOLDER] a line)")
    parser.add_argument("--dest", required=True, type=Path, help="the model volume's mount point, e.g. /models")
    args = parser.parse_args(argv)
    try:
        models = parse_list(args.list.read_text())
    except (OSError, ListError) as exc:
        print(f"pipeserve-fetch-models: {exc}", file=sys.stderr)
        return 2
    args.dest.mkdir(parents=True, exist_ok=True)
    for repo_id, revision, folder in models:
        fetched = fetch(repo_id, revision, args.dest / folder)
        print(f"{'fetched' if fetched else 'present'} {repo_id}@{revision or 'main'} -> {args.dest / folder}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
