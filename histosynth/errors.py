"""The one base class of the errors a user can fix.

Every error that comes from the user's input (a config key, a data folder, a checkpoint, an output
folder, a leakage finding, a NaN loss) derives from :class:`UserError`, so the command-line
wrapper (:func:`histosynth.cli.run_cli`) prints it as one line and exits 2. Anything else is a bug
and keeps its traceback. The set is declared by inheritance here, not collected at import time.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or folders; the message says what to change."""
