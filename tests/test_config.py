"""Settings precedence: defaults < TOML file < environment < flags."""
from __future__ import annotations

from pipeserve.config import load_settings


def test_precedence_file_env_flags(tmp_path):
    config = tmp_path / "pipeserve.toml"
    config.write_text('listen = "0.0.0.0:1"\ndevice = "cuda"\nmax_queue = 7\nuri_http_hosts = ["a.example"]\n'
                      '[preload]\nimage-classification = "/models/vit"\n'
                      'automatic-speech-recognition = { model = "/models/whisper", dtype = "float16" }\n')
    settings = load_settings(["--config", str(config), "--listen", "127.0.0.1:2"],
                             environ={"PIPESERVE_DEVICE": "cpu", "PIPESERVE_GRACE_PERIOD_S": "3.5"})
    assert settings.listen == "127.0.0.1:2"
    assert settings.device == "cpu"
    assert settings.max_queue == 7 and settings.grace_period_s == 3.5
    assert settings.uri_http_hosts == ("a.example",)
    assert settings.preload["image-classification"].model == "/models/vit"
    assert settings.preload["automatic-speech-recognition"].dtype == "float16"


def test_preload_flags_and_env(tmp_path):
    settings = load_settings(["--preload", "ner=/m/ner", "--embedded-defaults", "false"],
                             environ={"PIPESERVE_PRELOAD": "fill-mask=/m/mask"})
    assert settings.preload["token-classification"].model == "/m/ner"
    assert settings.preload["fill-mask"].model == "/m/mask"
    assert settings.embedded_defaults is False
