"""`pipeserve`: the command line for people (and, with --json, for scripts).

    pipeserve serve                               start a server (same flags as pipeserve-server)
    pipeserve models list|get|load|unload         manage the server's models
    pipeserve transcribe talk.wav                 segments print as they are decoded
    pipeserve generate "Once upon a time"         tokens print as they are generated
    pipeserve classify-image cat.jpg              ... and one command per task

Exit codes (stable; scripts may rely on them):
    0    success
    1    unexpected error in the client (a bug: please report it, with the traceback)
    2    usage error: unknown command or option, or an option value out of range
    3    input file problem: missing, unreadable, or a directory
    4    server unreachable: nothing listening, wrong address, TLS handshake failed,
         or the server is shutting down
    5    server rejected the request: bad input, unknown model, wrong task, not allowed,
         not implemented, queue full or out of memory
    6    server failed: internal error
    7    deadline exceeded (--timeout)
    8    connection lost mid-stream: results printed so far are valid, the rest is missing
    130  interrupted (Ctrl-C)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Iterable

from ._version import __version__

# grpc's C core logs TLS handshake failures and the like to stderr at INFO level; the CLI
# explains failures itself. Must be set before grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
EXIT_REJECTED, EXIT_SERVER_ERROR, EXIT_DEADLINE, EXIT_STREAM_LOST, EXIT_INTERRUPTED = 5, 6, 7, 8, 130

TASKS = ["automatic-speech-recognition", "text-generation", "image-classification", "zero-shot-classification",
         "document-question-answering", "text-classification", "token-classification", "question-answering",
         "fill-mask", "feature-extraction"]


class Fail(Exception):
    """A user-facing failure: a message for stderr and an exit code (and, for an error the
    server answered, its status, reason and metadata, which --json reports)."""

    def __init__(self, message: str, code: int, *, status: str = "", reason: str = "",
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status, self.reason, self.metadata = status, reason, dict(metadata or {})

    def as_json(self) -> str:
        """One JSON object for scripts (--json): the message, exit code, and what the server said."""
        error: dict[str, Any] = {"message": str(self), "exit_code": self.code}
        if self.status:
            error["status"] = self.status
        if self.reason:
            error["reason"] = self.reason
        if self.metadata:
            error["metadata"] = self.metadata
        return json.dumps({"error": error}, ensure_ascii=False)


# --- argument parsing -------------------------------------------------------------------------

def _connection_options() -> argparse.ArgumentParser:
    """Options valid before or after the command (`pipeserve --json models list` and
    `pipeserve models list --json` both work). SUPPRESS keeps a subcommand's unset copy
    from overwriting a value given before the command."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection and output")
    S = argparse.SUPPRESS
    group.add_argument("--server", default=S, metavar="HOST:PORT",
                       help="server address (default: $PIPESERVE_SERVER or 127.0.0.1:50051)")
    group.add_argument("--json", action="store_true", default=S,
                       help="print JSON (one object per line for streams) instead of text")
    group.add_argument("--timeout", type=float, default=S, metavar="SECONDS", help="deadline for the call")
    group.add_argument("--model", default=S, help="model name (default: the task's default model)")
    group.add_argument("--tls", action="store_true", default=S, help="connect with TLS (system root certificates)")
    group.add_argument("--ca-cert", default=S, metavar="FILE", help="PEM root certificate(s) to trust (implies --tls)")
    group.add_argument("--cert", default=S, metavar="FILE", help="PEM client certificate for mutual TLS")
    group.add_argument("--key", default=S, metavar="FILE", help="PEM client private key for mutual TLS")
    group.add_argument("--server-name", default=S, metavar="NAME", help="TLS server name to verify, if not the host")
    group.add_argument("--token", default=S, help="bearer token (default: $PIPESERVE_TOKEN)")
    group.add_argument("--no-retry", action="store_true", default=S, help="do not retry UNAVAILABLE / QUEUE_FULL")
    return parent


def build_parser() -> argparse.ArgumentParser:
    common = _connection_options()
    parser = argparse.ArgumentParser(prog="pipeserve", parents=[common],
                                     description="Client for the pipeserve gRPC inference server.",
                                     epilog="Exit codes" + __doc__.split("Exit codes", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pipeserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common], **kwargs)

    serve = commands.add_parser("serve", help="start a pipeserve server (arguments go to pipeserve-server)",
                                add_help=False)
    serve.add_argument("server_args", nargs=argparse.REMAINDER)

    models = command("models", "list, inspect, load and unload models")
    verbs = models.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    listing = verbs.add_parser("list", help="list the models", parents=[common])
    listing.add_argument("--task", choices=TASKS)
    get = verbs.add_parser("get", help="show one model", parents=[common])
    get.add_argument("name")
    load = verbs.add_parser("load", help="load a model from a local directory or Hub id", parents=[common])
    load.add_argument("name", help="local directory or Hub id")
    load.add_argument("--task", choices=TASKS, help="the task (default: inferred from config.json)")
    load.add_argument("--revision")
    load.add_argument("--device", help='"cpu", "cuda", "cuda:1" or "auto"')
    load.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    load.add_argument("--weights-dtype", choices=["float32", "float16"],
                      help="store the weights in this dtype: float16 under a float32 model halves its memory "
                           "(slower; Whisper)")
    load.add_argument("--int8", action="store_true", default=None, help="quantize weights to int8")
    load.add_argument("--quantization", choices=["none", "int8", "grouped"],
                      help="the weights' quantized form: float, int8, or grouped (groups of 32 on grids of up to "
                           "256 levels: a GGUF file's own values, 4-bit kernels; CPU, Gemma 3)")
    load.add_argument("--allow-pickle", action="store_true", default=None,
                      help="allow pickled .bin checkpoints (they can run code)")
    load.add_argument("--default", action="store_true", default=None, help="make it its task's default model")
    load.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="default call option, e.g. top_k=3 (JSON values)")
    unload = verbs.add_parser("unload", help="unload a model", parents=[common])
    unload.add_argument("name")

    t = command("transcribe", "transcribe an audio file, printing segments as they are decoded")
    t.add_argument("file", help="audio file (WAV, FLAC, OGG, MP3...), or - for standard input")
    t.add_argument("--timestamps", choices=["none", "segment", "word", "char"], default=None,
                   help="timestamp granularity (default: the model's)")
    t.add_argument("--language", help='spoken language code such as "en" (default: detected)')
    t.add_argument("--translate", action="store_true", help="translate into English")
    t.add_argument("--chunk-length", type=float, dest="chunk_length_s", metavar="SECONDS",
                   help="cut long audio into windows of this many seconds, decoded in batches")
    t.add_argument("--stride-length", type=float, dest="stride_length_s", metavar="SECONDS",
                   help="overlap on each side of a window (default: a sixth of it)")
    t.add_argument("--batch-size", type=int, metavar="N", help="windows of long audio decoded together")
    t.add_argument("--num-beams", type=int)
    t.add_argument("--initial-prompt")
    t.add_argument("--no-stream", action="store_true", help="wait for the whole transcription")
    progress = t.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", default=None,
                          help="show progress on stderr (default: when stderr is a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")

    g = command("generate", "generate text from a prompt, printing tokens as they are generated")
    g.add_argument("prompt", help="the prompt, or - for standard input")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--do-sample", action="store_true", default=None)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    g.add_argument("--num-return-sequences", type=int)
    g.add_argument("--full-text", dest="return_full_text", action="store_true", default=None,
                   help="include the prompt in the output")
    g.add_argument("--no-stream", action="store_true", help="wait for the whole text")

    ci = command("classify-image", "classify an image")
    ci.add_argument("file", help="image file (JPEG, PNG, WebP, GIF, BMP, TIFF), or - for standard input")
    ci.add_argument("--top-k", type=int)
    ci.add_argument("--function", dest="function_to_apply", choices=["sigmoid", "softmax", "none"])

    z = command("zero-shot", "score a text against labels of your choosing")
    z.add_argument("text", help="the text, or - for standard input")
    z.add_argument("--labels", required=True, help='comma-separated candidate labels, e.g. "sports,politics"')
    z.add_argument("--template", dest="hypothesis_template", help='hypothesis template, e.g. "This text is about {}."')
    z.add_argument("--multi-label", action="store_true", default=None, help="score labels independently")

    d = command("doc-qa", "answer a question about a document image")
    d.add_argument("file", help="document page image")
    d.add_argument("question")
    d.add_argument("--top-k", type=int)
    d.add_argument("--lang", help='OCR language, e.g. "eng"')

    ct = command("classify-text", "classify a text (sentiment, topic...)")
    ct.add_argument("text", help="the text, or - for standard input")
    ct.add_argument("--pair", dest="text_pair", help="second text, for sentence-pair models")
    ct.add_argument("--top-k", type=int)
    ct.add_argument("--function", dest="function_to_apply", choices=["sigmoid", "softmax", "none"])

    n = command("ner", "find named entities (token classification)")
    n.add_argument("text", help="the text, or - for standard input")
    n.add_argument("--aggregation", dest="aggregation_strategy",
                   choices=["none", "simple", "first", "average", "max"])

    q = command("qa", "answer a question from a context text")
    q.add_argument("question")
    q.add_argument("context", help="the context text, @FILE to read it from a file, or - for standard input")
    q.add_argument("--top-k", type=int)
    q.add_argument("--max-answer-len", type=int)

    f = command("fill-mask", "predict the masked token(s) of a text")
    f.add_argument("text", help='text with the model\'s mask token, e.g. "Paris is the [MASK] of France."')
    f.add_argument("--top-k", type=int)
    f.add_argument("--targets", help="comma-separated words to restrict the candidates to")

    e = command("embed", "compute the embedding of a text (feature extraction)")
    e.add_argument("text", help="the text, or - for standard input")
    e.add_argument("--pooling", choices=["none", "mean", "cls", "max"],
                   help="none returns token embeddings (default: the model's pooling)")
    e.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="scale to unit length (default: the model's setting, pooled embeddings only)")
    e.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=None,
                   help="cut a text longer than the model's input instead of refusing it")
    return parser


# --- helpers ------------------------------------------------------------------------------------

def _opt(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _read_text(value: str) -> str:
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        from .inputs import read_file

        return read_file(value[1:], "text").decode("utf-8", errors="replace")
    return value


def _read_input(value: str) -> bytes | str:
    """A FILE argument: "-" reads standard input; a path is read by the client library."""
    return sys.stdin.buffer.read() if value == "-" else value


def _dump(message: Any) -> None:
    from . import to_dict

    print(json.dumps(to_dict(message), ensure_ascii=False), flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(0.0, seconds), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:05.2f}" if hours else f"{minutes:02d}:{secs:05.2f}"


def _audio_duration(path: Any) -> float | None:
    """Duration of a local audio file, for the progress indicator (None when unknown)."""
    if not isinstance(path, str):
        return None
    try:
        import soundfile

        return float(soundfile.info(path).duration)
    except Exception:
        return None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n else "-"


def _print_labels(labels: Iterable[Any]) -> None:
    rows = list(labels)
    width = max((len(label.label) for label in rows), default=0)
    for label in rows:
        print(f"{label.label:<{width}}  {label.score:.4f}")


# --- commands -----------------------------------------------------------------------------------

def cmd_models(client: Any, args: argparse.Namespace) -> None:
    from pipeserve.v1 import model_pb2

    if args.verb == "list":
        models = client.models.list(args.task, timeout=_opt(args, "timeout"))
        if _opt(args, "json"):
            print(json.dumps({"models": [_to(m) for m in models]}, ensure_ascii=False))
            return
        if not models:
            print("no models loaded (load one with: pipeserve models load PATH)")
            return
        rows = [("NAME", "TASK", "STATE", "FAMILY", "DEVICE", "DTYPE", "SIZE", "DEFAULT")]
        for m in models:
            rows.append((m.name, _task_name(m.task), model_pb2.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower(),
                         m.family, m.device, _dtype(m), _mib(m.bytes), "yes" if m.is_default else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        return
    if args.verb == "load":
        options = {}
        for item in args.option:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise Fail(f"--option expects KEY=VALUE, got {item!r}", EXIT_USAGE)
            try:
                options[key] = json.loads(raw)
            except json.JSONDecodeError:
                options[key] = raw
        name = _local_model_path(args.name)
        if not _opt(args, "json"):
            if name != args.name:
                print(f"{args.name} is a local directory: asking the server to load {name} "
                      "(the server reads model paths on its own machine)", file=sys.stderr, flush=True)
            print(f"loading {name} ...", file=sys.stderr, flush=True)
        info = client.models.load(name, task=args.task, revision=args.revision, device=args.device,
                                  dtype=args.dtype, load_in_8bit=args.int8, allow_pickle=args.allow_pickle,
                                  set_default=args.default, default_options=options or None,
                                  timeout=_opt(args, "timeout"), weights_dtype=args.weights_dtype,
                                  quantization=args.quantization)
    elif args.verb == "get":
        info = client.models.get(args.name, timeout=_opt(args, "timeout"))
    else:
        info = client.models.unload(args.name, timeout=_opt(args, "timeout"))
    if _opt(args, "json"):
        print(json.dumps(_to(info), ensure_ascii=False))
        return
    if args.verb == "unload":  # the server has let go of it: family, device and size are gone
        print(f"unloaded {info.name or args.name}" + (f" ({_task_name(info.task)})" if info.task else ""))
        return
    state = model_pb2.ModelState.Name(info.state).removeprefix("MODEL_STATE_").lower()
    verb = {"load": "loaded"}.get(args.verb)
    print(f"{verb + ' ' if verb else ''}{info.name}: {_task_name(info.task)}, {info.family or '?'} "
          f"({info.architecture or '?'}), {state}, {info.device or '?'} {_dtype(info)}, {_mib(info.bytes)}"
          f"{', default' if info.is_default else ''}")
    defaults = _to(info).get("default_options")
    if defaults:
        print("default options: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(defaults.items())))
    if info.error:
        print(f"error: {info.error}")


def _dtype(info: Any) -> str:
    """The weights' dtype, marked when int8-quantized or stored narrower (float16/float32: float16
    weights, float32 compute; the float dtype after the slash is what they compute in)."""
    from pipeserve.v1 import model_pb2

    dtype = model_pb2.DType.Name(info.dtype).removeprefix("D_TYPE_").lower()
    if info.quantized_int8:
        return f"int8/{dtype}"
    if info.quantization == model_pb2.QUANTIZATION_GROUPED:
        return f"grouped/{dtype}"
    if info.weights_dtype:
        return model_pb2.DType.Name(info.weights_dtype).removeprefix("D_TYPE_").lower() + f"/{dtype}"
    return dtype


def _local_model_path(name: str) -> str:
    """A model name that exists as a path here becomes absolute: the server resolves relative
    paths in its own working directory, which is rarely the caller's. Anything else (a Hub
    id, a path on the server's machine) goes as given."""
    if name and os.path.exists(name) and not os.path.isabs(name):
        return os.path.abspath(name)
    return name


def _to(message: Any) -> dict:
    from . import to_dict

    return to_dict(message)


def _task_name(task: int) -> str:
    from pipeserve.v1 import model_pb2

    return model_pb2.Task.Name(task).removeprefix("TASK_").lower().replace("_", "-")


class _Progress:
    """One self-rewriting line on stderr: seconds of audio transcribed (and % when the
    file's duration is known), elapsed time, and a spinner while waiting."""

    FRAMES = "|/-\\"

    def __init__(self, enabled: bool, total_s: float | None) -> None:
        self.enabled, self.total_s, self.start, self.ticks = enabled, total_s, time.monotonic(), 0

    def waiting(self) -> None:
        """Before the first window is decoded there is no progress to show, only that it runs."""
        if self.enabled:
            sys.stderr.write("\rdecoding the first window ...\x1b[K")
            sys.stderr.flush()

    def finish(self, duration_s: float) -> None:
        """The transcription is complete: the bar ends full (the last segment may end before
        the audio does) and stays on its own line."""
        if self.enabled:
            self.total_s = self.total_s or duration_s or None
            self.update(self.total_s or duration_s)
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.enabled = False

    def update(self, done_s: float) -> None:
        if not self.enabled:
            return
        self.ticks += 1
        elapsed = time.monotonic() - self.start
        if self.total_s:
            share = min(1.0, done_s / self.total_s)
            bar = "#" * int(share * 20)
            text = f"[{bar:<20}] {share:4.0%} {_clock(done_s)} / {_clock(self.total_s)}"
        else:
            text = f"{self.FRAMES[self.ticks % 4]} {_clock(done_s)} transcribed"
        sys.stderr.write(f"\r{text}  ({elapsed:.1f}s elapsed)\x1b[K")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _segment_line(segment: Any) -> str:
    """A segment, then its words (or characters) with their timings when the server sent them."""
    end = _clock(segment.end_s) if segment.HasField("end_s") else "..."
    lines = [f"[{_clock(segment.start_s)} -> {end}] {segment.text.strip()}"]
    for unit in list(segment.words) or list(segment.chars):
        lines.append(f"    [{_clock(unit.start_s)} -> {_clock(unit.end_s)}] {unit.text.strip()}")
    return "\n".join(lines)


def cmd_transcribe(client: Any, args: argparse.Namespace) -> None:
    audio = _read_input(args.file)
    kwargs = dict(model=_opt(args, "model", ""), return_timestamps=args.timestamps, language=args.language,
                  task="translate" if args.translate else None, chunk_length_s=args.chunk_length_s,
                  stride_length_s=args.stride_length_s, batch_size=args.batch_size, num_beams=args.num_beams,
                  initial_prompt=args.initial_prompt, timeout=_opt(args, "timeout"))
    as_json = _opt(args, "json")
    if args.no_stream:
        response = client.transcribe(audio, **kwargs)
        if as_json:
            _dump(response)
            return
        for segment in response.transcription.segments:
            print(_segment_line(segment))
        if not response.transcription.segments:
            print(response.transcription.text.strip())
        return
    show = sys.stderr.isatty() if args.progress is None else args.progress
    progress = _Progress(show and not as_json, _audio_duration(audio))
    printed: set[str] = set()
    progress.waiting()
    try:
        for message in client.transcribe(audio, stream=True, **kwargs):
            if as_json:
                _dump(message)
                continue
            if message.HasField("segment"):
                segment = message.segment
                if segment.is_final and segment.id not in printed:
                    printed.add(segment.id)
                    progress.clear()
                    print(_segment_line(segment), flush=True)
                progress.update(segment.end_s if segment.HasField("end_s") else segment.start_s)
            elif message.HasField("done"):
                progress.clear()
                # Segments the stream delivered only as interim ones are printed from the result.
                for segment in message.done.transcription.segments:
                    if segment.id not in printed:
                        printed.add(segment.id)
                        print(_segment_line(segment), flush=True)
                if not message.done.transcription.segments and message.done.transcription.text.strip():
                    print(message.done.transcription.text.strip(), flush=True)
                progress.finish(message.done.transcription.duration_s)
    finally:
        progress.clear()


def cmd_generate(client: Any, args: argparse.Namespace) -> None:
    prompt = _read_text(args.prompt)
    kwargs = dict(model=_opt(args, "model", ""), max_new_tokens=args.max_new_tokens,
                  min_new_tokens=args.min_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                  stop=args.stop, num_return_sequences=args.num_return_sequences,
                  return_full_text=args.return_full_text, timeout=_opt(args, "timeout"))
    as_json = _opt(args, "json")
    if args.no_stream:
        response = client.generate(prompt, **kwargs)
        if as_json:
            _dump(response)
            return
        for i, sequence in enumerate(response.sequences):
            if len(response.sequences) > 1:
                print(f"--- sequence {i}")
            print(sequence.text)
        return
    later: dict[int, list[str]] = {}
    open_line = False
    try:
        for message in client.generate(prompt, stream=True, **kwargs):
            if as_json:
                _dump(message)
                continue
            index = message.sequence_index
            if message.HasField("token"):
                if index == 0:
                    sys.stdout.write(message.token.text)
                    sys.stdout.flush()
                    open_line = True
                else:  # further sequences print after the first, whole
                    later.setdefault(index, []).append(message.token.text)
            elif message.HasField("done") and index == 0:
                sys.stdout.write("\n")
                sys.stdout.flush()
                open_line = False
    finally:
        if open_line:  # the stream broke mid-line: end the line before the error message
            sys.stdout.write("\n")
            sys.stdout.flush()
    for index in sorted(later):
        print(f"--- sequence {index}\n{''.join(later[index])}")


def cmd_classify_image(client: Any, args: argparse.Namespace) -> None:
    response = client.classify_image(_read_input(args.file), model=_opt(args, "model", ""), top_k=args.top_k,
                                     function_to_apply=args.function_to_apply, timeout=_opt(args, "timeout"))
    _dump(response) if _opt(args, "json") else _print_labels(response.labels)


def cmd_zero_shot(client: Any, args: argparse.Namespace) -> None:
    response = client.zero_shot(_read_text(args.text), args.labels, model=_opt(args, "model", ""),
                                hypothesis_template=args.hypothesis_template, multi_label=args.multi_label,
                                timeout=_opt(args, "timeout"))
    _dump(response) if _opt(args, "json") else _print_labels(response.labels)


def cmd_doc_qa(client: Any, args: argparse.Namespace) -> None:
    response = client.document_qa(_read_input(args.file), args.question, model=_opt(args, "model", ""),
                                  top_k=args.top_k, lang=args.lang, timeout=_opt(args, "timeout"))
    if _opt(args, "json"):
        _dump(response)
        return
    for answer in response.answers:
        print(f"{answer.answer}  ({answer.score:.4f}, words {answer.start_word}-{answer.end_word})")
    if not response.answers:
        print("(no answer)")


def cmd_classify_text(client: Any, args: argparse.Namespace) -> None:
    response = client.classify_text(_read_text(args.text), text_pair=args.text_pair, model=_opt(args, "model", ""),
                                    top_k=args.top_k, function_to_apply=args.function_to_apply,
                                    timeout=_opt(args, "timeout"))
    _dump(response) if _opt(args, "json") else _print_labels(response.labels)


def cmd_ner(client: Any, args: argparse.Namespace) -> None:
    response = client.classify_tokens(_read_text(args.text), model=_opt(args, "model", ""),
                                      aggregation_strategy=args.aggregation_strategy, timeout=_opt(args, "timeout"))
    if _opt(args, "json"):
        _dump(response)
        return
    for entity in response.entities:
        print(f"{entity.entity:<8} {entity.word!r:<24} [{entity.start}:{entity.end}]  {entity.score:.4f}")
    if not response.entities:
        print("(no entities)")


def cmd_qa(client: Any, args: argparse.Namespace) -> None:
    response = client.answer_question(args.question, _read_text(args.context), model=_opt(args, "model", ""),
                                      top_k=args.top_k, max_answer_len=args.max_answer_len,
                                      timeout=_opt(args, "timeout"))
    if _opt(args, "json"):
        _dump(response)
        return
    for answer in response.answers:
        print(f"{answer.answer}  ({answer.score:.4f}, chars {answer.start}-{answer.end})")
    if not response.answers:
        print("(no answer)")


def cmd_fill_mask(client: Any, args: argparse.Namespace) -> None:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    response = client.fill_mask(_read_text(args.text), model=_opt(args, "model", ""), top_k=args.top_k,
                                targets=targets, timeout=_opt(args, "timeout"))
    if _opt(args, "json"):
        _dump(response)
        return
    for i, mask in enumerate(response.masks):
        if len(response.masks) > 1:
            print(f"--- mask {i}")
        for candidate in mask.candidates:
            print(f"{candidate.token_str!r:<16} {candidate.score:.4f}  {candidate.sequence}")


def cmd_embed(client: Any, args: argparse.Namespace) -> None:
    response = client.extract_features(_read_text(args.text), model=_opt(args, "model", ""), pooling=args.pooling,
                                       normalize=args.normalize, truncate=args.truncate,
                                       timeout=_opt(args, "timeout"))
    if _opt(args, "json"):
        _dump(response)
        return
    vectors = [response.sentence_embedding] if response.HasField("sentence_embedding") else list(response.token_embeddings)
    kind = "sentence embedding" if response.HasField("sentence_embedding") else f"{len(vectors)} token embeddings"
    print(f"{kind}: {response.dimensions} dimensions, {response.tokens} tokens (--json prints every value)")
    for vector in vectors:
        values = list(vector.values)
        head = ", ".join(f"{v:.4f}" for v in values[:8])
        print(f"[{head}{', ...' if len(values) > 8 else ''}]")


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], None]] = {
    "models": cmd_models, "transcribe": cmd_transcribe, "generate": cmd_generate,
    "classify-image": cmd_classify_image, "zero-shot": cmd_zero_shot, "doc-qa": cmd_doc_qa,
    "classify-text": cmd_classify_text, "ner": cmd_ner, "qa": cmd_qa, "fill-mask": cmd_fill_mask,
    "embed": cmd_embed,
}


# --- errors -> messages and exit codes ----------------------------------------------------------

def _explain(error: Exception, target: str, tls: bool) -> Fail:
    from . import errors as E

    said = dict(status=error.code.name if getattr(error, "code", None) is not None else "",
                reason=getattr(error, "reason", "") or "", metadata=getattr(error, "metadata", None))
    if isinstance(error, E.InputFileError):
        return Fail(str(error.details), EXIT_INPUT)
    if isinstance(error, E.InputError):
        return Fail(str(error.details), EXIT_USAGE)
    if isinstance(error, E.StreamInterruptedError):
        return Fail(f"the connection to {target} was lost mid-stream after {error.received} message(s) "
                    f"({error.details}); the output above is incomplete", EXIT_STREAM_LOST, **said)
    if isinstance(error, E.UnavailableError):
        details = error.details
        lowered = details.lower()
        if error.reason == "DRAINING":
            return Fail(f"the server at {target} is shutting down: {details}", EXIT_UNREACHABLE, **said)
        if any(word in lowered for word in ("ssl", "tls", "handshake", "certificate")):
            hint = ("check --ca-cert (the server's CA), --cert/--key (mutual TLS) and --server-name" if tls
                    else "the server may require TLS: try --tls / --ca-cert")
            return Fail(f"TLS connection to {target} failed: {details}\n  {hint}", EXIT_UNREACHABLE, **said)
        hint = ("check that the server is running and speaks TLS, that --ca-cert is the CA that signed its "
                "certificate (and --server-name matches it), and --cert/--key if it requires mutual TLS" if tls else
                "is the server running? start one with `pipeserve serve`, or set --server / PIPESERVE_SERVER; "
                "if it requires TLS, add --tls or --ca-cert")
        return Fail(f"cannot reach the pipeserve server at {target}: {details}\n  {hint}", EXIT_UNREACHABLE,
                    **said)
    if isinstance(error, E.DeadlineExceededError):
        return Fail(f"deadline exceeded: {error.details} (raise --timeout)", EXIT_DEADLINE, **said)
    if isinstance(error, E.InternalError):
        return Fail(f"the server failed: {error.details}", EXIT_SERVER_ERROR, **said)
    if isinstance(error, E.PipeserveError):
        reason = f" [{error.reason}]" if error.reason else ""
        extra = "".join(f"\n  {k}: {v}" for k, v in sorted(error.metadata.items()))
        name = error.code.name if error.code is not None else "ERROR"
        return Fail(f"the server rejected the request: {error.details} ({name}{reason}){extra}", EXIT_REJECTED,
                    **said)
    raise error


def _serve(server_args: list[str]) -> int:
    import importlib.util

    # pipeserve-client installs without the server (and torch): say what to install instead
    # of letting `python -m` print "No module named pipeserve.server".
    if importlib.util.find_spec("pipeserve.server") is None:
        print("pipeserve: `pipeserve serve` needs the server, which this installation lacks: "
              "pip install pipeserve", file=sys.stderr)
        return EXIT_USAGE
    command = [sys.executable, "-m", "pipeserve.server", *server_args]
    try:
        os.execv(sys.executable, command)
    except OSError as exc:  # pragma: no cover - exec only fails on a broken installation
        print(f"pipeserve: cannot start the server: {exc}", file=sys.stderr)
        return EXIT_BUG
    return EXIT_OK  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["serve"]:
        # Everything after `serve` belongs to the server (including --help).
        return _serve(argv[1:])
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    target = _opt(args, "server") or os.environ.get("PIPESERVE_SERVER") or "127.0.0.1:50051"
    tls = bool(_opt(args, "tls") or _opt(args, "ca_cert") or _opt(args, "cert"))
    try:
        from ._channel import NO_RETRY
        from .client import Client

        client = Client(target, timeout=_opt(args, "timeout"), tls=tls or None, root_certificates=_opt(args, "ca_cert"),
                        client_certificate=_opt(args, "cert"), client_key=_opt(args, "key"),
                        server_name=_opt(args, "server_name"),
                        token=_opt(args, "token") or os.environ.get("PIPESERVE_TOKEN") or None,
                        retry=NO_RETRY if _opt(args, "no_retry") else None)
        with client:
            COMMANDS[args.command](client, args)
        return EXIT_OK
    except KeyboardInterrupt:
        _report(Fail("interrupted", EXIT_INTERRUPTED), args)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `pipeserve ... | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Fail as usage:
        _report(usage, args)
        return usage.code
    except Exception as error:  # typed client errors become messages; anything else is a bug
        from .errors import PipeserveError

        if not isinstance(error, PipeserveError):
            raise
        explained = _explain(error, target, tls)
        _report(explained, args)
        return explained.code


def _report(failure: Fail, args: argparse.Namespace) -> None:
    """The failure on stderr: one line of text, or with --json one JSON object."""
    if _opt(args, "json"):
        print(failure.as_json(), file=sys.stderr, flush=True)
    else:
        newline = "\n" if failure.code == EXIT_INTERRUPTED else ""  # after a ^C on the line
        print(f"{newline}pipeserve: {failure}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
