"""``python -m flexpatch.cli``: the same as the ``flexpatch`` command."""

from __future__ import annotations

from flexpatch.cli import main

if __name__ == "__main__":
    main()
