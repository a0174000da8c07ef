"""Entry point of the `hf-moso` command: argument parsing, logging, and one-line errors with exit codes."""

import argparse
import logging as std_logging
import sys
import traceback

import datasets
from datasets.exceptions import DatasetGenerationError
from transformers.utils import logging

from .. import __version__
from . import card, prune, push, score
from .errors import EXIT_CODES_HELP, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_INVALID_INPUT, EXIT_SUCCESS

# Errors that mean an input of the command is wrong; the library raises these with the value and the fix.
INVALID_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, DatasetGenerationError)
LOG_LEVELS = ("debug", "info", "warning", "error")


class HelpFormatter(argparse.HelpFormatter):
    """Wrap paragraphs of help text, but keep text that already has line breaks (the exit code table) as it is."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log_level",
        choices=LOG_LEVELS,
        default="info",
        help="level of hf-moso's log messages on stderr (default: info); transformers and datasets log warnings "
        "and errors unless this is debug",
    )
    common.add_argument("--no_progress", action="store_true", help="hide progress bars (default: shown)")
    common.add_argument("--debug", action="store_true", help="print the full traceback of an error")

    parser = argparse.ArgumentParser(
        prog="hf-moso",
        description="MoSo (Moving-one-Sample-out) data pruning on the output folder of MoSoTrainer: score every row "
        "of a dataset, prune the lowest-scoring rows, write a dataset card and push the result to the Hub.",
        epilog=EXIT_CODES_HELP,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-moso {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = {"parents": [common], "epilog": EXIT_CODES_HELP, "formatter_class": HelpFormatter}
    for command in (score, prune, card, push):
        command.add_parser(subparsers, **shared)
    return parser


def configure_logging(level_name: str, show_progress: bool) -> None:
    """Send hf-moso's log records to stderr at `level_name`; keep transformers and datasets at warnings or above."""
    level = getattr(std_logging, level_name.upper())
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    package_logger = std_logging.getLogger("hf_moso")
    package_logger.handlers = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False

    library_level = level if level == std_logging.DEBUG else max(level, std_logging.WARNING)
    logging.set_verbosity(library_level)
    datasets.logging.set_verbosity(library_level)
    if not show_progress:
        logging.disable_progress_bar()
        datasets.disable_progress_bars()


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run `hf-moso` with `argv` (default: the process arguments) and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, show_progress=not args.no_progress)

    try:
        args.run(args)
    except KeyboardInterrupt:
        print("hf-moso: interrupted; run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except INVALID_INPUT_ERRORS as error:
        if args.debug:
            traceback.print_exc()
        print(f"hf-moso: error: {one_line(error)}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (rerun with --debug for the traceback)"
        print(f"hf-moso: error: {type(error).__name__}: {one_line(error)}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_SUCCESS
