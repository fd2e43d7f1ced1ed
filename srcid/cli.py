"""The one `srcid` entry point. Each sub-command lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (sub-command, module that defines `add_parser(subparsers)`); modules import lazily so `srcid --help` is fast.
COMMANDS: list[tuple[str, str]] = [
    ("train", "srcid.training.train_cli"),
    ("data", "srcid.training.data_cli"),
    ("export", "srcid.training.export"),
    ("index", "srcid.index.cli"),
    ("eval", "srcid.training.eval_cli"),
    ("serve", "srcid.service.cli"),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: with `command`, only that sub-command's (its module alone is imported), else all of them."""
    parser = argparse.ArgumentParser(
        prog="srcid",
        description="Train SRCID models on paired audio/video/text features, export them to ONNX, "
        "index catalogs and serve /encode and /retrieve over HTTP.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS:
        if command is None or name == command:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Only the named sub-command's module is imported: the training ones load torch (seconds), and `srcid serve`
    # sets OpenMP up before torch loads (srcid/service/cli.py). Help without a command, or a wrong one, lists all.
    named = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(named if named in dict(COMMANDS) else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"srcid {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
