"""The ``fastpeft`` command line: ``fastpeft train`` (LoRA fine-tuning) and ``fastpeft bench``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


class HelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help once, and only where it tells something.

    Not for on/off flags (``--qlora``, ``--no-chat-template``: their help says what they switch),
    not for a default of None (the help then says what happens instead), and not when the help
    already mentions its default (argparse's ArgumentDefaultsHelpFormatter would print it again).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import fastpeft

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return (f"fastpeft {fastpeft.__version__} (python {sys.version.split()[0]}, torch {v('torch')}, "
            f"transformers {v('transformers')})")


def build_parser() -> argparse.ArgumentParser:
    """The ``fastpeft`` parser with its ``train`` and ``bench`` commands."""
    from fastpeft.cli.arguments import add_train_arguments

    p = argparse.ArgumentParser(prog="fastpeft", description="fastpeft: PEFT with fused kernels",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="LoRA-fine-tune a causal LM on a JSONL dataset (no arguments: the built-in demo)",
                       description="LoRA-fine-tune a causal LM on a JSONL dataset. With no arguments: "
                                   "SmolLM2-135M-Instruct on the shipped task, a few minutes on CPU. "
                                   "Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint "
                                   "and exits with status 130; the same command plus --resume continues.",
                       formatter_class=HelpFormatter)
    add_train_arguments(t)
    # everything after `bench` goes to benchmarks/run.py untouched (see main: argparse's REMAINDER
    # does not capture a leading `--option` inside a subparser)
    sub.add_parser("bench", help="run the benchmarks (benchmarks/run.py of a source checkout); "
                                 "arguments are passed on, e.g. `fastpeft bench --quick`", add_help=False)
    return p


def _bench(extra: list[str]) -> int:
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "run.py"
    if not script.is_file():
        print(f"fastpeft bench: error: {script} not found; the benchmarks ship with a source checkout "
              "of fastpeft, not with the installed package", file=sys.stderr)
        return 2
    # run from the checkout's parent-free cwd: the repo root on sys.path would expose kernels/ as `kernels`
    return subprocess.call([sys.executable, str(script), *extra], cwd=os.getcwd())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastpeft`` console script; returns the exit status."""
    from fastpeft.cli.errors import TrainError, TrainInterrupted
    from fastpeft.cli.train import run_train

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        import transformers
        transformers.logging.set_verbosity_error()  # keep generation-config chatter out of the report
        run_train(args)
    except TrainError as exc:
        print(f"fastpeft train: error: {exc}", file=sys.stderr)
        return 2
    except TrainInterrupted as exc:
        print(f"fastpeft train: stopped by {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fastpeft train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
