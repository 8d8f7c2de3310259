"""``python -m minilora``: the same as the ``minilora`` command."""

from minilora.cli import main

if __name__ == "__main__":  # guarded: process pools (minilora sweep) may import this module
    raise SystemExit(main())
