"""The one exception type flexpatch raises for problems a user can fix."""

from __future__ import annotations


class FlexPatchError(Exception):
    """A user-facing error: one line naming the file, shape or size involved.

    The CLI prints the message and exits with code 2, without a traceback.
    """
