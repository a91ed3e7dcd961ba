"""The project's own error type for bad user input.

``train.py`` prints a ``QtrainError`` as one line (exit status 2) and writes it to the run's
``FAILED`` marker; any other exception is a bug or an environment problem and keeps its full
traceback. Raise it (or a subclass) only where the message names the key, layer or file at
fault and what is allowed. It subclasses ``ValueError`` so callers catching ``ValueError``
(and tests using ``pytest.raises(ValueError)``) keep working.
"""

from __future__ import annotations


class QtrainError(ValueError):
    """Bad input named by the message: a config key, a layer, a file, a kernel argument."""


class ConfigError(QtrainError):
    """A configuration value that is not allowed (names the key and the allowed values)."""


class DataFileError(QtrainError):
    """A dataset, checkpoint or packed file that is missing, truncated, corrupt or of another
    configuration (names the file and what to do)."""


class MissingFileError(DataFileError, FileNotFoundError):
    """A file or folder the config points at is not there (also a ``FileNotFoundError``, so
    callers catching that keep working)."""


def run_cli(main) -> None:
    """``python -m qtrain.<tool>``: run ``main()``; a :class:`QtrainError` is printed as one
    line on stderr with exit status 2 (as ``train.py`` does), anything else keeps its traceback."""
    import sys

    try:
        main()
    except QtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
