"""Running a command-line entry point: a user mistake is one `error: ...` line on stderr and exit status 2.

A traceback for a typo buries the one line that matters, and status 2 tells scripts "fix the command", not "crash".
Light (no torch), so an entry point can validate its command line before importing the heavy modules.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Optional

from tools.secrets import mask_text

USAGE_STATUS = 2


class InputError(Exception):
    """Bad input the user must fix (a data file, a model folder, a checkpoint, a path): one `error:` line, exit 2.

    Library code anywhere raises a subclass of this for input it refuses; the message names the file, row or key
    and says what to do. Entry points catch it in `run_cli`."""


class RunFailure(Exception):
    """A run that failed for a reason that is not the input (a lost node, a full disk mid-run): one line, exit 1."""


class UsageError(InputError):
    """A mistake on the command line: an unknown option, a missing argument, no such input file."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` instead of printing the usage and exiting, so `run_cli` reports it."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_cli(main: Callable[[list[str]], Optional[int]], *user_errors: type[BaseException]) -> NoReturn:
    """Exit with the status of `main(sys.argv[1:])`; a user mistake exits 2 with one `error: ...` line.

    User mistakes: `InputError` (`UsageError` among them), the entry point's own `user_errors` (e.g. ConfigError), and `sys.exit("message")`.
    Anything else is a bug and keeps its traceback.
    """
    try:
        status = main(sys.argv[1:])
    except (InputError, *user_errors) as error:
        fail(str(error))
    except SystemExit as stop:
        if isinstance(stop.code, str):
            fail(stop.code)
        raise
    sys.exit(status or 0)


def fail(message: str) -> NoReturn:
    """Print `message` as one masked `error:` line (a multi-line message joins with "; ") and exit 2."""
    lines = [line.strip() for line in mask_text(message).splitlines() if line.strip()] or ["unknown error"]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} {'; '.join(lines[1:])}"
    print(f"error: {text.removeprefix('error: ')}", file=sys.stderr)
    sys.exit(USAGE_STATUS)
