"""Tesseract OCR for document question answering: page image -> words and boxes normalised to
0-1000, exactly as transformers' DocumentQuestionAnsweringPipeline gets them through
pytesseract (transformers/pipelines/document_question_answering.py `apply_tesseract` and
`normalize_box`; pytesseract.image_to_data with output_type=dict).

We call the `tesseract` binary ourselves (Debian tesseract-ocr + tesseract-ocr-eng) instead of
depending on pytesseract: the same command line (`tesseract <png> <out> -l <lang> -c
tessedit_create_tsv=1`), the same PNG hand-off, the same TSV parsing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import grpc

from ..errors import InvalidInput, InvalidParameter, PipeserveError

# Tesseract language codes are letters, digits and underscores, joined with '+' for several
# (e.g. "eng", "chi_sim", "eng+deu"); anything else never reaches the command line.
_LANG = re.compile(r"^[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*$")
# Column of the recognised text in Tesseract's TSV (level page_num block_num par_num line_num
# word_num left top width height conf text): the last one.
_TSV_COLUMNS = 12
DEFAULT_TIMEOUT_S = 120.0


class OcrUnavailable(PipeserveError):
    """The server cannot run OCR (Tesseract or the language data is not installed)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "OCR_UNAVAILABLE"


class OcrFailed(PipeserveError):
    """Tesseract ran but failed on this image."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "OCR_FAILED"


@dataclass(frozen=True)
class Word:
    """A word on a page and its box (x0, y0, x1, y1), normalised to 0-1000."""

    text: str
    box: tuple[int, int, int, int]


def normalize_box(box: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """transformers' normalize_box: pixel box -> 0-1000, truncating as int() does."""
    return (
        int(1000 * (box[0] / width)),
        int(1000 * (box[1] / height)),
        int(1000 * (box[2] / width)),
        int(1000 * (box[3] / height)),
    )


def tesseract_binary() -> str | None:
    return os.environ.get("PIPESERVE_TESSERACT") or shutil.which("tesseract")


def _tsv_to_columns(tsv: str) -> dict[str, list]:
    """pytesseract.file_to_dict(tsv, '\\t', -1): numbers parsed as int(float()), the text column
    kept as is."""
    rows = [row.split("\t") for row in tsv.strip().split("\n")]
    if len(rows) < 2:
        return {}
    header = rows.pop(0)
    if len(rows[-1]) < len(header):
        rows[-1].append("")  # strip() ate the empty text cell of the last row
    text_col = len(header) - 1
    columns: dict[str, list] = {}
    for i, name in enumerate(header):
        values = []
        for row in rows:
            if len(row) <= i:
                continue
            if i == text_col:
                values.append(row[i])
                continue
            try:
                values.append(int(float(row[i])))
            except ValueError:
                values.append(row[i])
        columns[name] = values
    return columns


def words_from_tsv(tsv: str, width: int, height: int) -> list[Word]:
    """transformers' apply_tesseract after image_to_data: drop blank words, boxes
    (left, top, left + width, top + height) normalised by the page size."""
    data = _tsv_to_columns(tsv)
    if not data:
        return []
    words = []
    for text, left, top, w, h in zip(data["text"], data["left"], data["top"], data["width"], data["height"]):
        if not text.strip():
            continue
        words.append(Word(text, normalize_box([left, top, left + w, top + h], width, height)))
    return words


def run_tesseract(image, lang: str = "eng", config: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Word]:
    """OCR of a PIL image (already EXIF-transposed and RGB, as transformers' load_image gives it).

    Raises OcrUnavailable when Tesseract or the language is missing, InvalidParameter for a bad
    language code, OcrFailed when Tesseract fails on the image.
    """
    if not lang or not _LANG.match(lang):
        raise InvalidParameter(f"ocr_lang {lang!r} is not a Tesseract language code such as 'eng' or 'eng+deu'",
                               reason="INVALID_PARAMETER", metadata={"field": "ocr_lang"})
    binary = tesseract_binary()
    if binary is None:
        raise OcrUnavailable(
            "Tesseract OCR is not installed on the server (apt-get install tesseract-ocr tesseract-ocr-eng); "
            "send the page's words and boxes in the request instead")
    if "A" in image.getbands():
        # pytesseract.prepare: replace the alpha channel with a white background.
        from PIL import Image

        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, (0, 0), image.getchannel("A"))
        image = background
    width, height = image.size
    with tempfile.TemporaryDirectory(prefix="pipeserve_ocr_") as tmp:
        path = os.path.join(tmp, "page.png")
        image.save(path, format="PNG")  # pytesseract hands Tesseract a PNG of format-less images
        command = [binary, path, "stdout", "-l", lang, "-c", "tessedit_create_tsv=1", *config.split()]
        # One OpenMP thread: OCR output does not depend on it, and the server shares its cores.
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        try:
            done = subprocess.run(command, capture_output=True, timeout=timeout_s, env=env, check=False)
        except FileNotFoundError:
            raise OcrUnavailable(f"Tesseract OCR binary {binary!r} cannot be run; "
                                 "send the page's words and boxes in the request instead") from None
        except subprocess.TimeoutExpired:
            raise OcrFailed(f"Tesseract OCR took longer than {timeout_s:.0f} s on this image") from None
    errors = " ".join(done.stderr.decode("utf-8", "replace").split())
    if done.returncode != 0:
        if "Failed loading language" in errors or "Error opening data file" in errors:
            raise OcrUnavailable(f"Tesseract has no data for language {lang!r} on this server: {errors}",
                                 reason="OCR_LANGUAGE_UNAVAILABLE", metadata={"field": "ocr_lang"})
        raise OcrFailed(f"Tesseract OCR failed (exit {done.returncode}): {errors}")
    return words_from_tsv(done.stdout.decode("utf-8", "replace"), width, height)


def check_words(words: list[Word]) -> None:
    """Client-supplied words: non-empty text and boxes inside the model's 0-1000 grid."""
    for i, word in enumerate(words):
        if not word.text.strip():
            raise InvalidInput(f"words[{i}] has empty text", metadata={"field": "words"})
        x0, y0, x1, y1 = word.box
        if any(not 0 <= v <= 1000 for v in word.box) or x1 < x0 or y1 < y0:
            raise InvalidInput(f"words[{i}] box {list(word.box)} is not a normalised box: need "
                               "0 <= x0 <= x1 <= 1000 and 0 <= y0 <= y1 <= 1000", metadata={"field": "words"})
