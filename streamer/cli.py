"""The ``vigil`` command line.

Each subcommand parses its arguments here and hands them to the module that does the work, which
is imported only when that subcommand runs (so ``vigil check-config`` never loads torch).
Exit codes: 0 success, 1 runtime failure, 2 invalid usage or configuration.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, MutableMapping, Sequence

from streamer.redact import redact_text
from streamer.settings import ConfigError, load_settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_CONFIG = "/etc/vigil/config.yaml"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Shorter secrets are not masked in log text: masking every "abc" would garble the log, and
# vigil never logs a secret on purpose (this is the net under that rule, not the rule).
MIN_MASKED_SECRET_CHARS = 4
# Developer output of the model libraries that a user of the CLI should not see: transformers'
# warnings about configs and generation, and the progress bars of weight loading and writing
# (huggingface_hub's switch also turns off transformers' bars). Set before they are imported;
# a value already in the environment wins.
QUIET_MODEL_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then redacts every URL in the line (and traceback) and masks known secrets."""

    def __init__(self, fmt: str, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self._secrets = tuple(s for s in secrets if len(s) >= MIN_MASKED_SECRET_CHARS)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record), self._secrets)


def setup_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """One line per event on stderr: journald adds its own timestamps under systemd.

    Every line goes through ``RedactingFormatter``: URLs lose credentials and query values,
    ``secrets`` (the configured passwords) are masked wherever they appear.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(LOG_FORMAT, secrets))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # faiss logs which CPU build it tried at INFO: noise in a service's journal.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def quiet_model_libraries(environ: MutableMapping[str, str] = os.environ) -> None:
    """Turn off the model libraries' developer output (QUIET_MODEL_LIBRARIES) unless set already."""
    for name, value in QUIET_MODEL_LIBRARIES.items():
        environ.setdefault(name, value)


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"{exc.source}: invalid configuration", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.config}: OK ({len(settings.cameras)} camera(s))")
    return EXIT_OK


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """Run ``module:function(args)``, importing the module only when the subcommand runs."""

    def run(args: argparse.Namespace) -> int:
        module_name, function_name = target.split(":")
        return int(getattr(importlib.import_module(module_name), function_name)(args))

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigil", description="Streaming video memory daemon.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check-config", help="validate a config file (exit 0 valid, 2 invalid)")
    check.add_argument("config", help="path of the YAML config")
    check.set_defaults(func=_cmd_check_config)

    imp = sub.add_parser("import", help="ingest recorded files into memory as fast as possible")
    imp.add_argument(
        "paths", nargs="+", metavar="PATH", help="video file, or folder of segments (imported in time order)"
    )
    imp.add_argument("--camera", required=True, help="camera name the footage belongs to")
    imp.add_argument(
        "--start",
        help="wall-clock time of the first frame (ISO 8601; a single file only: otherwise each "
        "file's creation_time or the time in its name)",
    )
    imp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    imp.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    imp.set_defaults(func=_lazy("streamer.importer:cli_import"))

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    serve.set_defaults(func=_lazy("streamer.daemon:cli_serve"))

    ask = sub.add_parser("ask", help="ask a running daemon a question over MQTT")
    ask.add_argument("question")
    ask.add_argument("--camera", action="append", default=[], help="restrict to this camera (repeatable)")
    ask.add_argument("--after", help="only memory after this time (ISO 8601)")
    ask.add_argument("--before", help="only memory before this time (ISO 8601)")
    ask.add_argument("--top-k", type=int, help="chunks to retrieve")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--json", action="store_true", help="print the raw JSON answer")
    ask.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the answer")
    ask.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file for the broker settings")
    ask.set_defaults(func=_lazy("streamer.client:cli_ask"))

    status = sub.add_parser("status", help="show each camera's state (from the retained MQTT topics)")
    status.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file for the broker settings")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds to collect retained states")
    status.set_defaults(func=_lazy("streamer.client:cli_status"))

    events = sub.add_parser("events", help="list the events watches raised (from Redis)")
    events.add_argument("--camera", help="only this camera's events")
    events.add_argument("--watch", help="only this watch's events")
    events.add_argument("--after", help="only events reaching past this time (ISO 8601; naive: configured zone)")
    events.add_argument("--before", help="only events starting before this time (ISO 8601)")
    events.add_argument("--limit", type=int, default=100, help="at most this many, earliest first (%(default)s)")
    events.add_argument("--json", action="store_true", help="print a JSON list, as the MQTT API gives it")
    events.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    events.set_defaults(func=_lazy("streamer.events_cli:cli_events"))

    memory = sub.add_parser("memory", help="stored memory: sizes per tier, consolidation and budgets")
    memory_sub = memory.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    stats = memory_sub.add_parser("stats", help="chunks and bytes per camera and tier")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    stats.set_defaults(func=_lazy("streamer.compaction:cli_memory"))
    compact = memory_sub.add_parser("compact", help="run the consolidation tiers and size budgets now")
    compact.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    compact.set_defaults(func=_lazy("streamer.compaction:cli_memory"))

    models = sub.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = models_sub.add_parser("make-tiny", help="write tiny random models of the real architectures (for tests)")
    tiny.add_argument("dir", help="output directory (gets vlm/, qwen2_5_vl/ and embedder/)")
    tiny.set_defaults(func=_lazy("vlm.tiny:cli_make_tiny"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_model_libraries()
    setup_logging()
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"{exc.source}: invalid configuration", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
