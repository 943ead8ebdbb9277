"""``lighten`` entry point: parse arguments, dispatch to a subcommand, turn errors into exit codes.

Exit codes: 0 ok, 1 a lighten bug (traceback with --debug), 2 bad input (one ``error:`` line),
130 interrupted (finished stages are kept; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

# Subcommand name -> module. Each module has HELP, add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "demo": "lighten.cli.demo",
    "run": "lighten.cli.run",
    "check": "lighten.cli.check",
    "measure": "lighten.cli.measure",
    "analyze": "lighten.cli.analyze",
    "report": "lighten.cli.report",
    "export": "lighten.cli.export",
    "verify": "lighten.cli.verify",
    "env": "lighten.cli.env",
}


def _version() -> str:
    import lighten

    return getattr(lighten, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lighten",
        description="Make trained PyTorch models lighter and prove it with measurements.",
        epilog="Start with `lighten demo`; `lighten COMMAND --help` explains each command.",
    )
    parser.add_argument("--version", action="version", version=f"lighten {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for all errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        # SUPPRESS keeps `lighten --debug run ...` working: the subparser default would reset it.
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show tracebacks for all errors")
        module.add_arguments(cmd)
        cmd.set_defaults(handler=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the ``lighten`` script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    from lighten.errors import LightenError

    try:
        return int(args.handler.run(args) or 0)
    except LightenError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:
        if not _stdout_closed():  # a pipe of the command's own (a worker, a subprocess)
            return _internal_error(e, args.debug)
        _silence_stdout()  # `lighten env | head`: the reader left, nothing is wrong
        return 141  # 128 + SIGPIPE, what a command killed by the closed pipe returns
    except KeyboardInterrupt:
        hint = (" finished stages (and the baseline's finished training epochs) are saved; "
                "rerun the same command with --resume to continue."
                if getattr(args.handler, "RESUMABLE", False) else "")
        print(f"\ninterrupted.{hint}", file=sys.stderr)
        return 130
    except Exception as e:
        return _internal_error(e, args.debug)


def _internal_error(e: Exception, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    else:
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"internal error: {type(e).__name__}: {first} "
              "(a lighten bug; rerun with --debug for the traceback and report it)",
              file=sys.stderr)
    return 1


def _stdout_closed() -> bool:
    """Whether stdout's reader is gone: poll() flags the write end of a pipe whose read end
    closed with POLLERR (Linux, macOS). Without poll (Windows), assume it is."""
    import select

    if not hasattr(select, "poll"):
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no real file behind stdout (captured): not a closed pipe
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
