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


# ---- every configuration error is one line naming the setting and its source ---------------------

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeserve.config import RULES, ConfigError, Settings, build_parser

ROOT = Path(__file__).resolve().parents[1]


def _error(argv=(), environ=None, toml: str | None = None, tmp_path=None) -> str:
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        argv = ["--config", str(path), *argv]
    with pytest.raises(ConfigError) as info:
        load_settings(list(argv), environ=environ or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def _server(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real entry point, as a user runs it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIPESERVE_")}
    environ["PYTHONPATH"] = os.pathsep.join(str(ROOT / p) for p in ("service", "clients/python"))
    return subprocess.run([sys.executable, "-m", "pipeserve.server", *argv], capture_output=True, text=True,
                          env={**environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("argv, env, naming", [
    (["--max-queue", "abc"], {}, "--max-queue"),
    (["--hub-offline", "maybe"], {}, "--hub-offline"),
    ([], {"PIPESERVE_MAX_QUEUE": "abc"}, "PIPESERVE_MAX_QUEUE"),
])
def test_bad_values_exit_2_with_one_line_and_no_traceback(argv, env, naming):
    result = _server(*argv, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pipeserve-server: error: ") and naming in lines[0], lines


def test_misspelled_toml_key_exits_2_naming_it(tmp_path):
    path = tmp_path / "pipeserve.toml"
    path.write_text('max_queu = 3\n')
    result = _server("--config", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "max_queu" in result.stderr and "did you mean max_queue" in result.stderr and str(path) in result.stderr


@pytest.mark.parametrize("value", ["true", "1", "yes", "on", "TRUE", " On "])
def test_booleans_accept_only_the_usual_words(value):
    assert load_settings(["--hub-offline", value], environ={}).hub_offline is True
    assert load_settings([], environ={"PIPESERVE_HUB_OFFLINE": value}).hub_offline is True
    assert load_settings(["--hub-offline"], environ={}).hub_offline is True  # a bare flag means true
    for false in ("false", "0", "no", "off"):
        assert load_settings(["--compute-lane", false], environ={}).compute_lane is False
    for bad in ("maybe", "2", "", "truee"):
        assert "--hub-offline" in _error(["--hub-offline", bad])
        assert "PIPESERVE_HUB_OFFLINE" in _error(environ={"PIPESERVE_HUB_OFFLINE": bad})


def test_flag_env_and_toml_errors_name_their_source(tmp_path):
    assert _error(["--max-queue", "abc"]) == "--max-queue: 'abc' is not an integer"
    assert _error(environ={"PIPESERVE_MAX_QUEUE": "1.5"}) == "PIPESERVE_MAX_QUEUE: '1.5' is not an integer"
    message = _error(toml='max_queue = "eight"\n', tmp_path=tmp_path)
    assert "bad.toml: max_queue" in message and "not an integer" in message
    assert "not a boolean" in _error(toml='hub_offline = "maybe"\n', tmp_path=tmp_path)
    assert "not a string" in _error(toml='listen = 5\n', tmp_path=tmp_path)
    assert "not a list of strings" in _error(toml='uri_http_hosts = [1, 2]\n', tmp_path=tmp_path)
    assert "not a finite number" in _error(["--grace-period-s", "nan"])
    assert "not valid TOML" in _error(toml='max_queue = \n', tmp_path=tmp_path)
    assert "cannot read" in _error(["--config", str(tmp_path / "missing.toml")])
    assert "unrecognized arguments: --max-queu" in _error(["--max-queu", "3"])  # no abbreviations either


@pytest.mark.parametrize("argv, naming, why", [
    (["--max-queue", "0"], "--max-queue", ">= 1"),
    (["--max-batch-size", "-1"], "--max-batch-size", ">= 1"),
    (["--memory-budget-bytes", "-5"], "--memory-budget-bytes", ">= 0"),
    (["--max-message-bytes", "10"], "--max-message-bytes", ">= 1024"),
    (["--listen", "127.0.0.1:70000"], "--listen", "port from 0 to 65535"),
    (["--listen", "nohost"], "--listen", "HOST:PORT"),
    (["--metrics-listen", "1.2.3.4"], "--metrics-listen", "HOST:PORT"),
    (["--uri-fetch-timeout-s", "0"], "--uri-fetch-timeout-s", "> 0"),
    (["--grace-period-s", "-1"], "--grace-period-s", ">= 0"),
    (["--log-format", "xml"], "--log-format", "text, json"),
    (["--log-level", "verbose"], "--log-level", "debug, info"),
    (["--dtype", "float8"], "--dtype", "float32"),
    (["--device", "tpu"], "--device", "not a device name"),
    (["--uri-http-hosts", "a.example,http://b.example"], "--uri-http-hosts", "not URLs"),
    (["--uri-http-hosts", "a.example:0"], "--uri-http-hosts", "port 1-65535"),
    (["--uri-fetch-concurrency", "0"], "--uri-fetch-concurrency", "between 1 and 1024"),
])
def test_ranges_and_choices(argv, naming, why):
    message = _error(argv)
    assert message.startswith(naming + ":") and why in message, message


def test_enum_constraint_applies_to_on_demand_loading_when_the_field_exists():
    check = RULES["on_demand_loading"].check
    assert check("off") is None and check("local") is None and check("any") is None
    assert "off, local, any" in check("sometimes")


def test_device_that_does_not_exist_lists_the_devices_that_do(tmp_path):
    import torch

    if torch.cuda.is_available():
        wanted = f"cuda:{torch.cuda.device_count()}"
    else:
        wanted = "cuda"
    message = _error(["--device", wanted])
    assert message.startswith("--device:") and "not available" in message and "cpu" in message
    message = _error(toml=f'[preload]\nfill-mask = {{ model = "/m", device = "{wanted}" }}\n', tmp_path=tmp_path)
    assert "[preload] fill-mask.device" in message and "devices here: cpu" in message
    result = _server("--device", wanted)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "devices here: cpu" in result.stderr


def test_preload_mistakes_are_config_errors(tmp_path):
    assert "unknown task" in _error(["--preload", "summarise=/m"])
    assert "TASK=MODEL" in _error(["--preload", "fill-mask"])
    assert "PIPESERVE_PRELOAD" in _error(environ={"PIPESERVE_PRELOAD": "nonsense"})
    message = _error(toml='[preload]\nfill-mask = { model = "/m", dtyp = "float16" }\n', tmp_path=tmp_path)
    assert "unknown key 'dtyp'" in message and "did you mean dtype" in message
    assert "needs a model" in _error(toml='[preload]\nfill-mask = { device = "cpu" }\n', tmp_path=tmp_path)
    assert "not a bool" in _error(toml='[preload]\nfill-mask = { model = "/m", load_in_8bit = "yes" }\n',
                                  tmp_path=tmp_path)


def test_unknown_pipeserve_variables_warn_and_known_neighbours_do_not():
    warnings: list[str] = []
    settings = load_settings([], environ={"PIPESERVE_MAX_QUEU": "3", "PIPESERVE_TOKEN": "t",
                                          "PIPESERVE_HEALTHCHECK_SERVICE": "x", "PIPESERVE_SERVER": "h:1"},
                             warn=warnings.append)
    assert settings.max_queue == Settings().max_queue
    assert warnings == ["PIPESERVE_MAX_QUEU is not a setting, ignored (did you mean PIPESERVE_MAX_QUEUE?)"]


def test_every_setting_has_a_flag_with_help_and_its_default():
    help_text = build_parser({}).format_help()
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        if f.name == "preload":
            continue
        assert f.name in RULES and RULES[f.name].help, f"{f.name} needs a description in config.RULES"
        assert "--" + f.name.replace("_", "-") in help_text
    assert "[default: 256; env PIPESERVE_MAX_QUEUE]" in " ".join(help_text.split())
    assert f"[default: {defaults.listen};" in help_text
    result = _server("--help")
    assert result.returncode == 0 and "--max-streams-per-client" in result.stdout and "--preload" in result.stdout


def test_server_and_cli_print_their_version():
    import pipeserve

    result = _server("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pipeserve {pipeserve.__version__}"
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("service", "clients/python"))}
    cli = subprocess.run([sys.executable, "-m", "pipeserve_client.cli", "--version"], capture_output=True, text=True,
                         env=environ, timeout=60)
    assert cli.returncode == 0 and cli.stdout.strip() == f"pipeserve {pipeserve.__version__}", cli.stderr
