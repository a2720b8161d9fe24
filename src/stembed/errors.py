"""The one base class of errors a user can fix (stdlib only, so the CLI catches them without importing torch).

Every module's own error (``CubeError``, ``BundleError``, ...) derives from :class:`UserError`; the
CLI prints its message (problem and fix) and exits with status 2. Anything else is a bug.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, configuration or request; the message names the problem and the fix."""
