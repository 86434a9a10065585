"""User-facing failures and the exit codes they map to.

Every problem a user can cause (a bad path, a bad file, a bad option) is raised as a :class:`SegcliError`
subclass carrying a one-line message; the CLI prints that line on stderr and exits with the class's code.
Anything else is a bug and is reported as an internal error (exit 1), with the traceback under ``--debug``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug in segcli: please report it with --debug output
EXIT_USAGE = 2  # bad option values (also click's own usage errors)
EXIT_INPUT = 3  # missing/empty/unreadable inputs, unwritable outputs, mismatched evaluation pairs
EXIT_SKIPPED = 4  # the run finished, but at least one image was reported and skipped
EXIT_MODEL = 5  # unusable backbone, weights checkpoint or model file
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: finished files are kept, rerun the same command to resume


class SegcliError(Exception):
    """A failure the user can act on; ``str(err)`` is the whole message."""

    exit_code = EXIT_INPUT


class UsageError(SegcliError):
    exit_code = EXIT_USAGE


class InputError(SegcliError):
    exit_code = EXIT_INPUT


class OutputError(SegcliError):
    exit_code = EXIT_INPUT


class ModelError(SegcliError):
    """Backbone, weights or fitted-model file cannot be used."""

    exit_code = EXIT_MODEL


class BadImageError(SegcliError):
    """One image cannot be used; the run reports it by name and goes on with the others."""

    exit_code = EXIT_SKIPPED
