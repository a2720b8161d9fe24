"""The base class of errors a user can fix, and the errors several layers raise (stdlib only, so the CLI catches
them without importing torch).

Every module's own error (``CubeError``, ``BundleError``, ...) derives from :class:`UserError`; the
CLI prints its message (problem and fix) and exits with status 2. Anything else is a bug.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, configuration or request; the message names the problem and the fix."""


class CubeBuildError(UserError):
    """A cube that cannot be built as asked (``stembed cube``); the message names the problem and the fix.

    Here, not in :mod:`stembed.cube_build`, because three layers raise it: the S2 radiometry
    (:mod:`stembed.preprocess`), the odc-stac loading (:mod:`stembed.io.stac_load`) and the build itself.
    """
