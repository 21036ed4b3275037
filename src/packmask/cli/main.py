"""The ``packmask`` command line: ``demo``, ``pack``, ``stats``, ``verify``, ``bench``.

Worked example (see ``docs/cli.md`` for the output of each)::

    $ packmask demo                                   # the whole job on the embedded corpus
    $ packmask pack docs.jsonl -o packed.parquet --max-length 4096
    $ packmask stats docs.jsonl --max-length 4096     # same report, writes nothing
    $ packmask verify --model llama                   # packed == alone on a tiny random Llama
    $ packmask bench                                  # train-step time against transformers' packing

This module parses (:mod:`.parser`, standard library only), then imports the one module that runs
the chosen subcommand. Every error a user can act on prints one line,
``error: <what> (fix: <what to do>)``, on stderr and exits with status 2; ``--debug`` (before or
after the subcommand) shows the traceback instead. Unexpected failures print one line too (exit
status 1) and ask for ``--debug``. Ctrl-C exits 130 and SIGTERM 143, both after removing any
half-written temporary file (outputs are only ever renamed into place complete).
"""
from __future__ import annotations

import importlib
import signal
import sys
import traceback
from contextlib import contextmanager

from .errors import EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, STOPS, CLIError, Terminated, raise_if_stopped
from .parser import OVERFLOWS, STRATEGIES, build_parser

__all__ = ["main", "run", "CLIError", "build_parser", "STRATEGIES", "OVERFLOWS"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m packmask`` and of :func:`packmask.cli.main`; returns the exit status."""
    return run(build_parser().parse_args(argv))


def _raise_terminated(signum, frame):
    STOPS.append(signum)  # a library, or a __del__, may swallow the exception but not this
    raise Terminated()


def _raise_interrupt(signum, frame):
    STOPS.append(signum)
    raise KeyboardInterrupt()


@contextmanager
def _sigterm_unwinds():
    """SIGTERM raises :class:`Terminated` (so ``finally`` blocks clean up) while a command runs."""
    STOPS.clear()  # a command run in the same process after a stopped one starts afresh
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (e.g. called from a worker): leave signals alone
        yield
        return
    # Ctrl-C keeps Python's behaviour (KeyboardInterrupt) but is recorded too, unless someone set their own
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupt)
    previous_hook = sys.unraisablehook

    def quiet_stops(unraisable):  # a stop swallowed in a __del__ is recorded and acted on: no traceback for it
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and STOPS):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_stops
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
        sys.unraisablehook = previous_hook


def run(args) -> int:
    """Run parsed arguments (``args.run`` = ``"module:function"`` inside :mod:`packmask.cli`)."""
    from rich.console import Console

    debug = getattr(args, "debug", False)
    console = Console()
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    with _sigterm_unwinds():
        try:
            if not debug:
                _quiet_libraries()
            module_name, function_name = args.run.split(":")
            command = getattr(importlib.import_module(f"{__package__}.{module_name}"), function_name)
            status = command(args, console)
            raise_if_stopped()  # a SIGTERM whose exception was swallowed still stops the command
            return status
        except KeyboardInterrupt as stop:
            return _stopped(errors, stop)
        except CLIError as error:
            return _report(errors, debug, str(error), error.exit_code)
        except OSError as error:  # unwritable --out-dir / -o, a full disk, ...
            return _report(errors, debug, f"{error} (fix: check that the path exists, is writable and has space)",
                           EXIT_USAGE)
        except Exception as error:  # noqa: BLE001 -- the last line of defence: no traceback unless --debug
            from ..errors import PackmaskError

            stop = _interrupt_behind(error) or (Terminated() if STOPS else None)
            if stop is not None:  # a library (Arrow, pandas) re-raised our Ctrl-C / SIGTERM as its own error
                return _stopped(errors, stop)

            if isinstance(error, PackmaskError):  # packmask's own messages name the fix
                return _report(errors, debug, str(error), EXIT_USAGE)
            return _report(errors, debug, f"{type(error).__name__}: {error} (fix: run again with --debug for "
                                          "the traceback, and report it if the cause is not your input)",
                           EXIT_FAILED)


def _stopped(errors, stop: KeyboardInterrupt) -> int:
    terminated = isinstance(stop, Terminated)
    errors.print("terminated" if terminated else "interrupted")
    return EXIT_SIGTERM if terminated else EXIT_SIGINT


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C / SIGTERM that caused ``error``, if any (following ``__cause__`` / ``__context__``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _report(errors, debug: bool, message: str, code: int) -> int:
    from rich.markup import escape

    if debug:
        traceback.print_exc()
    errors.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", markup=True)
    return code


def _quiet_libraries() -> None:
    """Library chatter (warnings, datasets bars) would bury the one table the user asked for."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("datasets").setLevel(logging.ERROR)
    for name in ("transformers", "datasets"):  # already imported (``import packmask`` imports transformers)
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "logging"):
            module.logging.set_verbosity_error()
    if "datasets" in sys.modules and hasattr(sys.modules["datasets"], "disable_progress_bars"):
        sys.modules["datasets"].disable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
