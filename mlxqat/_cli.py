"""What every command shares: one error path, and checked numbers.

Every ``main()`` (``python -m mlxqat.train``, ``generate``, ``profile``,
``export``, the ``mlxqat`` dispatcher) runs through :func:`run_main` (or the
:func:`command` decorator), so a failure ends the same way everywhere:

* an expected failure (bad input: ``ValueError``, which includes
  :class:`mlxqat.storage.manifest.IntegrityError` and :class:`UsageError`; ``OSError``;
  ``FloatingPointError``; a chat-template error) prints one line
  ``error: <message>`` to stderr and exits with status 2;
* Ctrl-C prints a one-line note and exits with status 130;
* anything else is a bug: one line naming the exception, exit status 1.

``MLXQAT_DEBUG=1`` in the environment also prints the traceback.

:class:`Number` is a range of numbers written once and checked in two places:
at parse time (as an argparse ``type=``, with :class:`ArgumentParser` naming
the flag) and in library dataclasses (``TrainingArgs.__post_init__``).
"""

from __future__ import annotations

import argparse
import errno
import functools
import math
import numbers
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

__all__ = [
    "UsageError", "run_main", "command", "describe_error", "Number", "ArgumentParser",
    "positive_int", "non_negative_int", "finite_float", "positive_float", "non_negative_float",
    "unit_float", "probability",
]

DEBUG_ENV = "MLXQAT_DEBUG"
EXIT_BAD_INPUT = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130

# errno values that mean "the write failed", with the fix to suggest
_WRITE_ERRORS = {
    errno.EROFS: "choose a writable location",
    errno.ENOSPC: "free some disk space or choose another location",
    errno.EDQUOT: "free some disk space or choose another location",
    errno.EFBIG: "choose another location",
}


class UsageError(ValueError):
    """Bad input from the user: the command prints the message and exits with status 2."""


# ---------------------------------------------------------------------------
# One error path
# ---------------------------------------------------------------------------


def _expected_errors() -> Tuple[type, ...]:
    """Exception types that mean bad input or a bad environment, not a bug."""
    types: Tuple[type, ...] = (ValueError, OSError, FloatingPointError)
    try:
        # lazy: only a failing chat template needs it
        from jinja2.exceptions import TemplateError
    except ImportError:  # jinja2 comes with transformers; without it there are no template errors
        return types
    return types + (TemplateError,)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe_error(e: BaseException) -> str:
    """The one-line message of an expected failure.

    An ``OSError`` from the operating system names the path and ``strerror``
    (``cannot write /x/y: [Errno 30] Read-only file system; choose a writable
    location``); one raised with a message of its own keeps that message.
    """
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        path = os.fsdecode(e.filename)
        if e.filename2 is not None:
            path += f" -> {os.fsdecode(e.filename2)}"
        what = f"[Errno {e.errno}] {e.strerror}"
        if e.errno in _WRITE_ERRORS:
            return f"cannot write {path}: {what}; {_WRITE_ERRORS[e.errno]}"
        return f"{path}: {what}"
    if isinstance(e, OSError) and e.strerror:
        fix = f"; {_WRITE_ERRORS[e.errno]}" if e.errno in _WRITE_ERRORS else ""
        return f"[Errno {e.errno}] {e.strerror}{fix}"
    return _one_line(e) or type(e).__name__


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(fn: Callable[..., Optional[int]], *args, interrupted: str = "interrupted", **kwargs) -> int:
    """Call a command's body and turn every way it can end into an exit status.

    Args:
        fn: the command; returns its exit status (``None`` is 0).
        args, kwargs: passed to ``fn``.
        interrupted: the note printed on Ctrl-C.

    Returns:
        ``fn``'s status; 2 for an expected failure (one ``error:`` line on stderr),
        130 for Ctrl-C, 1 for an unexpected exception (a bug), and the code of a
        ``SystemExit`` (argparse's ``--help`` is 0, its usage errors 2).
    """
    try:
        return int(fn(*args, **kwargs) or 0)
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)  # sys.exit("message")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except _expected_errors() as e:
        if _debug():
            traceback.print_exc()
        print(f"error: {describe_error(e)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Exception as e:
        if _debug():
            traceback.print_exc()
        print(
            f"error: unexpected {type(e).__name__}: {_one_line(e)}; this is a bug in mlxqat: please report it on "
            f"the issue tracker of the mlxqat repository, with the command line and the traceback that "
            f"{DEBUG_ENV}=1 prints",
            file=sys.stderr, flush=True,
        )
        return EXIT_BUG


def command(interrupted: str = "interrupted") -> Callable:
    """Decorator form of :func:`run_main` for a ``main(argv=None) -> int``."""

    def wrap(fn):
        @functools.wraps(fn)
        def main(*args, **kwargs) -> int:
            return run_main(fn, *args, interrupted=interrupted, **kwargs)

        return main

    return wrap


# ---------------------------------------------------------------------------
# Checked numbers
# ---------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Number:
    """A range of ints or finite floats: one object, checked at parse time and in the library.

    As an argparse ``type=`` it parses the text (``--steps 1e4`` is the int
    10000); :meth:`check` validates a Python value (``TrainingArgs`` fields).
    NaN and infinity are never accepted; bools are not numbers here.
    """

    kind: type = float  # int or float
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False

    def describe(self) -> str:
        """``"an integer >= 1"``, ``"a number in (0, 1]"``, ``"a finite number > 0"``."""
        if self.low is not None and self.high is not None:
            noun = "an integer" if self.kind is int else "a number"
            return (f"{noun} in {'(' if self.low_open else '['}{_fmt(self.low)}, "
                    f"{_fmt(self.high)}{')' if self.high_open else ']'}")
        noun = "an integer" if self.kind is int else "a finite number"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return noun

    def contains(self, value) -> bool:
        """Whether ``value`` is a number of this kind inside the range."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False  # (an int is always finite, and may be too large for a float)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def check(self, value, name: str):
        """Return ``value``; raise ``ValueError("name=value must be ...")`` outside the range."""
        if not self.contains(value):
            raise ValueError(f"{name}={value!r} must be {self.describe()}")
        return value

    def parse(self, text: str):
        """The number ``text`` spells, or ``ValueError`` when it is not one in the range."""
        value = None
        try:
            value = int(text) if self.kind is int else float(text)
        except ValueError:
            if self.kind is int:  # "1e4" -> 10000
                try:
                    f = float(text)
                    value = int(f) if math.isfinite(f) and f.is_integer() else None
                except ValueError:
                    pass
        if value is None or not self.contains(value):
            raise ValueError(f"{text} is not {self.describe()}")
        return value

    def __call__(self, text: str):
        try:
            return self.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def for_flag(self, flag: str) -> Callable[[str], object]:
        """An argparse ``type=`` whose error reads ``--top-p 2: must be a number in (0, 1]``."""

        def convert(text: str):
            try:
                return self.parse(text)
            except ValueError:
                raise argparse.ArgumentError(None, f"{flag} {text}: must be {self.describe()}") from None

        convert.number = self  # what the flag accepts, for help and tests
        return convert


positive_int = Number(int, low=1)
non_negative_int = Number(int, low=0)
finite_float = Number(float)
positive_float = Number(float, low=0, low_open=True)
non_negative_float = Number(float, low=0)
unit_float = Number(float, low=0, high=1)  # [0, 1]
probability = Number(float, low=0, high=1, low_open=True)  # (0, 1]


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose :class:`Number` types name the flag in their errors.

    ``--top-p 2`` fails with ``error: --top-p 2: must be a number in (0, 1]``
    (plain argparse would say ``argument --top-p: 2 is not ...``).
    """

    def add_argument(self, *flags, **kwargs):
        typ = kwargs.get("type")
        if isinstance(typ, Number) and flags:
            longest = max(flags, key=len)
            kwargs["type"] = typ.for_flag(longest)
        return super().add_argument(*flags, **kwargs)
