"""Running a command-line entry point: every failure is one `error: ...` line on stderr, with a status that says whose.

Status 2: bad input the user must fix (a typo, a data file, a model folder); status 1: a run that failed (a lost node,
a full disk, a bug). A traceback on the console buries the one line that matters, so it goes to a log file instead:
`<run folder>/logs/error.log` once the entry point has named its run folder (`log_errors_to`), else a file under the
system temp dir. `--debug` on the command line or `LATENT_RL_DEBUG=1` prints it on the console too.
Light (no torch, no Ray), so an entry point can validate its command line before importing the heavy modules.
"""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

from common.secrets import mask_text

INPUT_STATUS, FAILURE_STATUS = 2, 1
USAGE_STATUS = INPUT_STATUS
HELP_FLAGS, DEBUG_FLAG, DEBUG_ENV = ("-h", "--help"), "--debug", "LATENT_RL_DEBUG"
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
LOW_SPACE = 1 << 20  # a run that fails with less than this free on its run folder's disk failed for lack of space
ERROR_LOG = Path("logs") / "error.log"


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


# ---- where the traceback goes -------------------------------------------------------------------------------------
_run_dir: Optional[Path] = None


def log_errors_to(run_dir: str | os.PathLike) -> None:
    """Send a failure's traceback to `<run_dir>/logs/error.log`: the entry point calls this once its run folder is
    known, so the traceback lies beside the checkpoints and metrics of the run it belongs to."""
    global _run_dir
    _run_dir = Path(run_dir)


def write_traceback(text: str, in_run: bool = True) -> Optional[Path]:
    """Append `text` to the run's error log, or (no run folder yet, it cannot be written: a read-only or full disk,
    or not `in_run`: a refused input, which must leave the run folder as it was) to a new file under the system temp
    dir; None when neither can be written."""
    stamp, name = time.strftime("%Y-%m-%d %H:%M:%S"), f"{_program()}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    temp = Path(tempfile.gettempdir()) / "latent-rl-errors" / f"{name}.log"
    for path in ([_run_dir / ERROR_LOG] if _run_dir and in_run else []) + [temp]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"==== {stamp} {_program()} {mask_text(' '.join(sys.argv[1:]))}\n{text}\n")
            return path
        except OSError:
            continue
    return None


def _program() -> str:
    """The entry point's module name (`RL.train_vlpo`), from how Python was started."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name.removesuffix(".__main__") if spec and spec.name else Path(sys.argv[0]).stem
    return name.lstrip("-") or "python"  # `python -c` names itself "-c"


# ---- running an entry point ---------------------------------------------------------------------------------------
def run_cli(main: Callable[[list[str]], Optional[int]], *user_errors: type[BaseException],
            usage: Optional[str] = None) -> NoReturn:
    """Exit with the status of `main(argv)`; every exception becomes one `error: ...` line (see the module docstring).

    User mistakes (exit 2): `InputError` (`UsageError` among them), the entry point's own `user_errors` (e.g.
    ConfigError), `sys.exit("message")`, and a Ray task error caused by one of these. Anything else exits 1.
    `usage` (the entry point's docstring) is printed for `-h`/`--help`; argparse entry points print their own.
    """
    argv, debug = take_debug_flag(sys.argv[1:])
    if usage and any(item in HELP_FLAGS for item in argv):
        print(usage.strip())
        sys.exit(0)
    try:
        status = main(argv)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            fail(stop.code)
        raise
    except Exception as error:  # noqa: BLE001 - every failure ends as one line; its traceback goes to the log
        report(error, user_errors, debug)
    sys.exit(status or 0)


def take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without `--debug` (the config parser must not see it), and whether tracebacks go to the console."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [item for item in argv if item != DEBUG_FLAG], debug


def report(error: BaseException, user_errors: tuple, debug: bool) -> NoReturn:
    """Log the traceback, then exit with one line: 2 for a user mistake, 1 (with the log's path) for a failure."""
    text = mask_text("".join(traceback.format_exception(error)))
    mistake = user_mistake(error, (InputError, *user_errors))
    log = write_traceback(text, in_run=mistake is None)
    if debug:
        print(text, file=sys.stderr, end="")
    if mistake is not None:
        fail(str(mistake))
    where = f"full traceback in {log}" if log else "the traceback could not be saved: run again with --debug"
    fail(f"{failure_summary(error)} ({where})", FAILURE_STATUS)


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and what caused it: `raise ... from`, and the remote exception a Ray task error carries (`.cause`)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        remote = getattr(error, "cause", None)
        error = remote if isinstance(remote, BaseException) else error.__cause__


def _ray_wrapper(error: BaseException) -> bool:
    """A RayTaskError subclasses its cause's class, but its message is the whole remote traceback."""
    return type(error).__module__.startswith("ray.")


def user_mistake(error: BaseException, kinds: tuple) -> Optional[BaseException]:
    """The user mistake behind `error` (itself, or what it wraps), or None for a failed run."""
    if isinstance(error, RunFailure):
        return None
    return next((item for item in causes(error) if isinstance(item, kinds) and not _ray_wrapper(item)), None)


def failure_summary(error: BaseException) -> str:
    """What failed, in a line: a RunFailure's own message, a full disk with its path, else the innermost exception
    with the place it was raised (a bug: the log has the rest)."""
    chain = [item for item in causes(error) if not _ray_wrapper(item)] or [error]
    failure = next((item for item in chain if isinstance(item, RunFailure)), None)
    if failure is not None:
        return str(failure)
    full = next((item for item in chain if disk_full(item)), None)
    if full is not None:  # a failed write() names no file: then the run folder it wrote in
        return str(no_space_failure(full.filename or _run_dir or "a file", full.strerror))
    free = _free_bytes(_run_dir)
    if free is not None and free < LOW_SPACE:  # torch.save on a full disk raises a RuntimeError without errno
        return str(no_space_failure(_run_dir, f"{free} bytes free on its disk"))
    cause = chain[-1]
    frames = traceback.extract_tb(cause.__traceback__)
    place = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    message = str(cause).strip().splitlines()
    return f"{type(cause).__name__}{': ' + message[0] if message else ''}{place}"


def disk_full(error: BaseException) -> bool:
    """Whether `error` is a write refused for lack of space (a full disk, a file-size limit or a quota)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL


def no_space_failure(path, reason: str) -> RunFailure:
    """The failed run a full disk makes, naming the file or folder being written and what to do."""
    return RunFailure(f"no space left writing {path} ({reason}); free space on that disk and run the same command "
                      "again: a run resumes from its newest complete checkpoint")


def _free_bytes(folder: Optional[Path]) -> Optional[int]:
    """Free bytes on the disk of the run folder (None when there is none yet)."""
    try:
        return shutil.disk_usage(folder).free if folder else None
    except OSError:
        return None


def fail(message: str, status: int = INPUT_STATUS) -> NoReturn:
    """Print `message` as one masked `error:` line (a multi-line message joins with "; ") and exit with `status`."""
    lines = [line.strip() for line in mask_text(message).splitlines() if line.strip()] or ["unknown error"]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} {'; '.join(lines[1:])}"
    print(f"error: {text.removeprefix('error: ')}", file=sys.stderr)
    sys.exit(status)
