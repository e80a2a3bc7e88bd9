"""Image input end to end at the pipeline level: decoding (formats, EXIF, colour modes),
image-processor parity with transformers (pixel values identical), final labels and scores
identical to transformers.pipeline("image-classification"), batching, and bad input.
"""
from __future__ import annotations

import io
import json
import resource
import shutil
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from harness import assert_close, load_pipeline, save_checkpoint

transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from pipeserve.errors import InputTooLarge, InvalidInput, InvalidParameter, UnsupportedFormat  # noqa: E402
from pipeserve.inputs.image import decode_image  # noqa: E402
from pipeserve.inputs.image_processing import ImageProcessor  # noqa: E402

SCORE_ATOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            image_size=32, patch_size=8)
LABELS = ["tabby", "tiger", "lynx", "astronaut", "coffee", "camera", "rocket"]


# -- test images -------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def exif_jpeg(orientation: int) -> bytes:
    image = Image.fromarray(skdata.coffee()[::2, ::2])  # 200x300, not square: rotation shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=90, exif=exif.tobytes())


def animated_gif() -> bytes:
    first = Image.fromarray(skdata.chelsea()).convert("P")
    second = Image.new("RGB", first.size, (255, 0, 0)).convert("P")
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def rgba_png() -> bytes:
    rgb = skdata.chelsea()
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1], dtype=np.uint8), (rgb.shape[0], 1))
    return encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG")


def palette_png_with_transparency() -> bytes:
    image = Image.fromarray(skdata.chelsea()).quantize(64)
    return encode(image, "PNG", transparency=0)


def gray16_png() -> bytes:
    pixels = (skdata.camera().astype(np.uint16) * 257)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    return encode(image, "PNG")


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    astronaut = Image.fromarray(skdata.astronaut())
    chelsea = Image.fromarray(skdata.chelsea())
    return {
        "jpeg_astronaut": encode(astronaut, "JPEG", quality=90),
        "png_chelsea": encode(chelsea, "PNG"),
        "png_rgba": rgba_png(),
        "png_gray": encode(Image.fromarray(skdata.camera()), "PNG"),
        "png_gray16": gray16_png(),
        "png_la": encode(Image.fromarray(skdata.chelsea()).convert("LA"), "PNG"),
        "png_palette_transparent": palette_png_with_transparency(),
        "jpeg_exif_rotate90": exif_jpeg(6),
        "jpeg_exif_rotate180": exif_jpeg(3),
        "jpeg_exif_mirror": exif_jpeg(2),
        "jpeg_cmyk": encode(chelsea.convert("CMYK"), "JPEG"),
        "webp_lossless": encode(chelsea, "WEBP", lossless=True),
        "webp_lossy": encode(astronaut, "WEBP", quality=80),
        "gif_animated": animated_gif(),
        "bmp": encode(chelsea, "BMP"),
        "tiff": encode(astronaut, "TIFF"),
        "png_tiny_1x1": encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    }


# -- checkpoints -------------------------------------------------------------------------

def _processor(**kwargs):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    return ViTImageProcessorPil(**kwargs)


def _classifier(seed: int, **config):
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**TINY, **config)).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("vit_pipelines")
    id2label = dict(enumerate(LABELS))
    paths = {
        # ViT defaults: bilinear resize to 32x32, mean/std 0.5, softmax over 7 named labels.
        "bilinear": save_checkpoint(_classifier(0, id2label=id2label, label2id={v: k for k, v in id2label.items()}),
                                    root / "bilinear", _processor(size={"height": 32, "width": 32})),
        # Bicubic shortest-edge resize, centre crop, ImageNet statistics; multi-label -> sigmoid.
        "bicubic_crop": save_checkpoint(
            _classifier(1, num_labels=4, problem_type="multi_label_classification"), root / "bicubic_crop",
            _processor(size={"shortest_edge": 40}, resample=3, do_center_crop=True,
                       crop_size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                       image_std=[0.229, 0.224, 0.225], rescale_factor=1 / 255)),
        # A single output: transformers applies a sigmoid by default.
        "one_label": save_checkpoint(_classifier(2, num_labels=1), root / "one_label",
                                     _processor(size={"height": 32, "width": 32}, resample=0)),
    }
    # Same weights, shortest-edge resize without crop: processed sizes differ per image.
    varied = root / "shortest_edge"
    shutil.copytree(paths["bilinear"], varied)
    config = json.loads((varied / "preprocessor_config.json").read_text())
    config["size"] = {"shortest_edge": 32}
    (varied / "preprocessor_config.json").write_text(json.dumps(config))
    paths["shortest_edge"] = varied
    return paths


@pytest.fixture(scope="module")
def ours(checkpoints):
    return {name: load_pipeline(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def reference(checkpoints):
    return {name: transformers.pipeline("image-classification", model=str(path))
            for name, path in checkpoints.items() if name != "shortest_edge"}


def reference_pixels(path, data: bytes) -> torch.Tensor:
    """What transformers' pipeline feeds the model: load_image, then the saved image processor."""
    from transformers.image_utils import load_image

    processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    return processor(images=load_image(Image.open(io.BytesIO(data))), return_tensors="pt")["pixel_values"][0]


def as_pairs(results: list[dict]) -> list[tuple[str, float]]:
    return [(r["label"], r["score"]) for r in results]


def assert_same_results(ours: list[tuple[str, float]], theirs: list[tuple[str, float]]) -> None:
    assert [label for label, _ in ours] == [label for label, _ in theirs]
    assert np.allclose([s for _, s in ours], [s for _, s in theirs], atol=SCORE_ATOL, rtol=0)


# -- decoding ----------------------------------------------------------------------------

def test_every_format_decodes_to_rgb(images):
    for name, data in images.items():
        image = decode_image(data)
        assert image.mode == "RGB", name


def test_exif_orientation_is_honoured(images):
    upright = decode_image(exif_jpeg(1))
    rotated = decode_image(images["jpeg_exif_rotate90"])
    assert upright.size == (300, 200)
    assert rotated.size == (200, 300)  # orientation 6: the stored image is turned a quarter


def test_gif_uses_the_first_frame(images):
    first = np.asarray(Image.open(io.BytesIO(images["gif_animated"])).convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(images["gif_animated"])), first)
    assert not (first == [255, 0, 0]).all()  # the second frame is solid red


# -- pixel values ------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", ["bilinear", "bicubic_crop", "one_label", "shortest_edge"])
def test_pixel_values_identical_to_transformers(checkpoints, ours, images, checkpoint):
    pipeline = ours[checkpoint]
    for name, data in images.items():
        expected = reference_pixels(checkpoints[checkpoint], data)
        got = torch.from_numpy(pipeline.processor(decode_image(data)))
        assert got.shape == expected.shape, name
        diff = (got - expected).abs().max().item()
        assert diff == 0.0, f"{checkpoint}/{name}: max |ours - transformers| = {diff}"


def test_processor_reads_int_and_list_sizes():
    square = ImageProcessor.from_dict({"size": 48})
    assert square.output_size(100, 300) == (48, 48)
    edge = ImageProcessor.from_dict({"size": 48, "default_to_square": False})
    assert edge.output_size(100, 300) == (48, 144)
    capped = ImageProcessor.from_dict({"size": {"shortest_edge": 48, "longest_edge": 96}})
    assert capped.output_size(100, 300) == (32, 96)
    assert ImageProcessor.from_dict({"size": [20, 30]}).output_size(5, 5) == (20, 30)


# -- final outputs -----------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", ["bilinear", "bicubic_crop", "one_label"])
@pytest.mark.parametrize("top_k", [None, 1, 3, 100])
def test_labels_and_scores_identical_to_transformers(ours, reference, images, checkpoint, top_k):
    names = ["jpeg_astronaut", "png_rgba", "png_gray", "jpeg_exif_rotate90", "gif_animated"]
    kwargs = {} if top_k is None else {"top_k": top_k}
    expected = reference[checkpoint]([Image.open(io.BytesIO(images[n])) for n in names], **kwargs)
    got = ours[checkpoint].classify([images[n] for n in names], {"top_k": top_k})
    for name, mine, theirs in zip(names, got, expected):
        assert len(mine) == min(top_k or 5, ours[checkpoint].num_labels), name
        assert_same_results(mine, as_pairs(theirs))


@pytest.mark.parametrize("function", ["softmax", "sigmoid", "none", "SoftMax"])
def test_function_to_apply_matches_transformers(ours, reference, images, function):
    data = images["png_chelsea"]
    expected = reference["bilinear"](Image.open(io.BytesIO(data)), function_to_apply=function, top_k=7)
    [got] = ours["bilinear"].classify([data], {"function_to_apply": function, "top_k": 7})
    assert_same_results(got, as_pairs(expected))


def test_default_function_rule(ours):
    assert ours["bilinear"].default_function() == "softmax"
    assert ours["bicubic_crop"].default_function() == "sigmoid"  # multi_label_classification
    assert ours["one_label"].default_function() == "sigmoid"  # num_labels == 1


def test_logits_match_transformers_on_a_photograph(checkpoints, ours, images):
    data = images["jpeg_astronaut"]
    model = transformers.ViTForImageClassification.from_pretrained(str(checkpoints["bilinear"])).eval()
    pixels = reference_pixels(checkpoints["bilinear"], data)[None]
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits[0]
    pipeline = ours["bilinear"]
    assert_close(pipeline.forward([pipeline.preprocess(data)])[0], expected)


@pytest.mark.parametrize("checkpoint", ["bilinear", "shortest_edge"])
def test_batched_equals_one_by_one(ours, images, checkpoint):
    pipeline = ours[checkpoint]
    names = list(images)
    batched = pipeline.classify([images[n] for n in names], {"top_k": 7})
    for name, result in zip(names, batched):
        [alone] = pipeline.classify([images[name]], {"top_k": 7})
        assert [label for label, _ in result] == [label for label, _ in alone], name
        assert np.allclose([s for _, s in result], [s for _, s in alone], atol=1e-6, rtol=0), name


def test_model_defaults_are_overridden_per_call(checkpoints, images):
    pipeline = load_pipeline(checkpoints["bilinear"], defaults={"top_k": 2})
    assert len(pipeline.classify([images["bmp"]])[0]) == 2
    assert len(pipeline.classify([images["bmp"]], {"top_k": 4, "function_to_apply": None})[0]) == 4


# -- bad input ---------------------------------------------------------------------------

def png_header_bomb(width: int, height: int) -> bytes:
    """A valid, highly compressible 1-bit PNG of width x height zeros (a few tens of KB that
    would decode to width*height*3 bytes of RGB)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    block = row * rows_per_block
    idat = b"".join(compressor.compress(block) for _ in range(height // rows_per_block))
    idat += compressor.compress(row * (height % rows_per_block)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bomb_builder_makes_a_real_png():
    image = decode_image(png_header_bomb(300, 200))
    assert image.size == (300, 200) and not np.asarray(image).any()


# 10000x10000 passes Pillow's own refusal (2 * 89M pixels) and is stopped by our header check;
# 20000x20000 is refused by Pillow's check inside Image.open, mapped to the same error.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [20000, 10000])
def test_decompression_bomb_refused_before_decoding(ours, images, side):
    bomb = png_header_bomb(side, side)
    assert len(bomb) < 200_000
    pipeline = ours["bilinear"]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(InputTooLarge) as caught:
        pipeline.classify([bomb], {})
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert elapsed < 1.0, f"refusal took {elapsed:.2f}s"
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB"
    assert caught.value.reason == "INPUT_TOO_LARGE"
    assert "too large" in caught.value.message or "the limit is" in caught.value.message
    assert pipeline.classify([images["png_chelsea"]], {})  # the next call works


def test_max_pixels_limit_is_configurable(checkpoints, ours, images):
    pipeline = ours["bilinear"]
    pipeline.max_pixels = 1000
    try:
        with pytest.raises(InputTooLarge, match=r"300 = 135,300 pixels; the limit is 1,000"):
            pipeline.classify([images["png_chelsea"]], {})
    finally:
        pipeline.max_pixels = 89_478_485
    assert pipeline.classify([images["png_chelsea"]], {})
    # The server's setting reaches the pipeline through LoadOptions.max_image_pixels.
    limited = load_pipeline(checkpoints["bilinear"], max_image_pixels=100 * 100)
    assert limited.classify([encode(Image.new("RGB", (100, 100)), "PNG")], {})
    with pytest.raises(InputTooLarge, match="101x100"):
        limited.classify([encode(Image.new("RGB", (101, 100)), "PNG")], {})


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("case,make,error,reason,message", [
    ("empty", lambda im: b"", InvalidInput, "EMPTY_INPUT", "empty"),
    ("text file", lambda im: b"This is a text file, not an image.\n" * 20, UnsupportedFormat,
     "UNSUPPORTED_FORMAT", "not an image in a supported format"),
    ("pdf", lambda im: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", UnsupportedFormat, "UNSUPPORTED_FORMAT",
     "supported format"),
    ("ppm (a format we do not accept)", lambda im: encode(Image.new("RGB", (4, 4)), "PPM"), UnsupportedFormat,
     "UNSUPPORTED_FORMAT", "JPEG, PNG, WebP, GIF, BMP, TIFF"),
    ("png signature then garbage", lambda im: b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10, InvalidInput,
     "CORRUPT_IMAGE", "PNG"),
    ("png header only", lambda im: im["png_chelsea"][:40], InvalidInput, "CORRUPT_IMAGE", "corrupt or truncated"),
    ("truncated png", lambda im: _truncated(im["png_chelsea"]), InvalidInput, "CORRUPT_IMAGE", "truncated"),
    ("truncated jpeg", lambda im: _truncated(im["jpeg_astronaut"]), InvalidInput, "CORRUPT_IMAGE", "truncated"),
    ("truncated webp", lambda im: _truncated(im["webp_lossy"]), InvalidInput, "CORRUPT_IMAGE", "WEBP"),
    ("truncated gif", lambda im: _truncated(im["gif_animated"]), InvalidInput, "CORRUPT_IMAGE", "GIF"),
    ("jpeg with corrupt body", lambda im: im["jpeg_astronaut"][:600] + bytes(range(256)) * 8, InvalidInput,
     "CORRUPT_IMAGE", "JPEG"),
])
def test_bad_image_bytes_get_typed_errors(ours, images, case, make, error, reason, message):
    pipeline = ours["bilinear"]
    with pytest.raises(error) as caught:
        pipeline.classify([make(images)], {})
    assert caught.value.reason == reason, case
    assert message in caught.value.message, caught.value.message
    assert pipeline.classify([images["png_chelsea"]], {})  # the pipeline keeps serving


def test_bad_image_in_a_batch_names_its_index(ours, images):
    with pytest.raises(UnsupportedFormat, match=r"^image 1: "):
        ours["bilinear"].classify([images["bmp"], b"plain text, no image"], {})


@pytest.mark.parametrize("options,match", [
    ({"top_k": 0}, "top_k must be at least 1, got 0"),
    ({"top_k": -3}, "top_k must be at least 1, got -3"),
    ({"top_k": "3"}, "top_k must be an integer"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"function_to_apply": "tanh"}, "function_to_apply must be one of sigmoid, softmax, none"),
])
def test_bad_options_get_invalid_parameter(ours, images, options, match):
    with pytest.raises(InvalidParameter, match=match):
        ours["bilinear"].classify([images["png_chelsea"]], options)


def test_no_images_and_non_bytes_are_invalid_input(ours):
    with pytest.raises(InvalidInput, match="no images"):
        ours["bilinear"].classify([], {})
    with pytest.raises(InvalidInput, match="must be bytes"):
        ours["bilinear"].classify(["/etc/passwd"], {})


def test_bad_load_time_defaults_are_refused(checkpoints):
    with pytest.raises(InvalidParameter, match="top_k"):
        load_pipeline(checkpoints["bilinear"], defaults={"top_k": 0})
    with pytest.raises(InvalidParameter, match="unknown default options"):
        load_pipeline(checkpoints["bilinear"], defaults={"temperature": 1.0})
