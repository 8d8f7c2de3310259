"""File formats: safetensors reading and writing, atomic writes and checked JSON reads.

Depends on the core only (``minilora.errors``, ``minilora._checks``); everything above it
(``minilora.peft``, ``minilora.testing``, ``minilora.study``, ``minilora.cli``) reads and writes
files through here.

- ``minilora.formats.safetensors``: ``load_safetensors``, ``save_safetensors``, ``read_header``
- ``minilora.formats.fileio``: ``atomic_open`` (write-then-rename), ``read_json`` (checked JSON reads)
"""
