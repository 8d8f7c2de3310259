"""``python -m minilora``: the same as the ``minilora`` command."""

from .cli import main

raise SystemExit(main())
