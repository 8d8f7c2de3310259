"""The ``minilora`` command line: argparse and printing only, one module per command.

Each command module has ``register(subparsers)`` and ``run(args)``; the work itself is done by the
library (``minilora.study``, ``minilora.testing``, ``minilora.peft``), which never imports this package.
"""

from minilora.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
