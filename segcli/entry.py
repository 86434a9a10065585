"""The process entry point (``segcli`` and ``python -m segcli``): the whole life of the process says one line.

:func:`segcli.cli.main` turns every failure of a command into one ``segcli:`` line and an exit code, but a
process also lives before and after the command: importing the CLI takes ~0.15 s, and after the summary line
the interpreter still tears down torch, thread pools and multiprocessing helpers for up to a few seconds. A
Ctrl-C or SIGTERM in those windows used to print a traceback or kill the process with a raw signal status, and
late library warnings (PIL, torch, the multiprocessing resource tracker) reached stderr after the last line.
So, here and only here (a library caller of :mod:`segcli.cli` keeps its own signal handlers and stderr):

* SIGINT and SIGTERM raise KeyboardInterrupt from the first line on, so an interrupt while the CLI is still
  being imported is the usual one line and exit 130;
* Python warnings are off unless ``--debug`` (or ``SEGCLI_DEBUG``) is given; ``-W ignore`` is also handed to
  the worker and resource-tracker processes multiprocessing spawns;
* once the command has ended (its last line is written and its exit code is known), a signal ends the process
  at once with that exit code, and nothing more is written to stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings

INTERRUPTED = "segcli: error: interrupted; finished files are kept: run the same command again to resume"


def _raise_interrupt(signum, frame):  # noqa: ANN001
    """Before and after a command's own handler: stop (exit 130), unless the command's outcome is already fixed
    (see segcli.cli.FINISHED), where the signal is only noted and the process then exits with that outcome."""
    state = _finished_state()
    if state is not None and state["done"]:
        state["signalled"] = True
        return
    raise KeyboardInterrupt


def _finished_state() -> dict | None:
    """segcli.cli.FINISHED, once that module is (fully) imported."""
    return getattr(sys.modules.get("segcli.cli"), "FINISHED", None)


def _quiet_thread_errors(args) -> None:  # noqa: ANN001
    """A background thread's exception while the run is being interrupted (a worker pool's pipes closing under
    it: ``OSError: [Errno 9] Bad file descriptor``) is a side effect of the stop, not news: not printed.
    Any other thread exception is printed as Python does."""
    state = _finished_state()
    if state is not None and (state.get("interrupted") or state.get("done")):
        return
    _DEFAULT_THREAD_HOOK(args)


_DEFAULT_THREAD_HOOK = threading.excepthook


def _debugging() -> bool:
    return "--debug" in sys.argv[1:] or bool(os.environ.get("SEGCLI_DEBUG"))


def _quiet_after(code: int) -> None:
    """The command is over: a signal now exits with its code, and stderr is closed to late library noise."""
    def leave(signum, frame):  # noqa: ANN001
        os._exit(code)

    signal.signal(signal.SIGINT, leave)
    signal.signal(signal.SIGTERM, leave)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main() -> None:
    """Run the CLI with the process-wide rules above."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    debug = _debugging()
    if not debug:
        threading.excepthook = _quiet_thread_errors
        warnings.simplefilter("ignore")
        sys.warnoptions.append("ignore")  # spawned children (workers, resource tracker) start with -W ignore
    code = 0
    try:
        from segcli import cli

        cli.main()
    except KeyboardInterrupt:  # while importing, parsing, or outside any command's own handler
        print(INTERRUPTED, file=sys.stderr, flush=True)
        code = 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr, flush=True)
    state = _finished_state()
    if state is not None and state["signalled"]:  # asked to stop once the outcome was fixed: stop now
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    if not debug:
        _quiet_after(code)
    sys.exit(code)
