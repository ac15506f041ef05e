"""The one exception type flexpatch raises for problems a user can fix."""

from __future__ import annotations

from collections.abc import Sequence


class FlexPatchError(Exception):
    """A user-facing error: one line naming the file, shape or size involved.

    The CLI prints the message and exits with code 2, without a traceback.
    """


def format_shape(shape: Sequence[int]) -> str:
    """A patch, window or image shape as users write it: ``96x96x64``."""
    return "x".join(str(int(s)) for s in shape)
