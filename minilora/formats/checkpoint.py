"""A model checkpoint as ``transformers`` saves it, read one tensor at a time: a ``.safetensors``
file, a sharded index (``model.safetensors.index.json``), or a model folder holding either.

    file      one safetensors file
    index     {"metadata": {...}, "weight_map": {tensor name: shard file name}}; the shards sit
              next to the index
    folder    model.safetensors.index.json if present, else model.safetensors, else its only
              *.safetensors file; config.json (and generation_config.json, tokenizer files) beside it

Every shard's header is read and checked (``safetensors.read_header_streaming``) before any
tensor is: an index that names a missing shard, a shard holding a tensor the index puts
elsewhere (or does not name), a tensor of the index missing from its shard, or a tensor in two
shards is a ``CheckpointError`` naming the file and the tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from minilora.formats import safetensors as st
from minilora.formats.fileio import read_json

__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint", "INDEX_NAME", "MODEL_FILES"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# files copied from a base folder into an output folder (besides config.json), when present
MODEL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
               "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


class CheckpointError(st.SafetensorsError):
    """A checkpoint (file, index or folder) that is missing, inconsistent or corrupt; names the file."""


@dataclass
class Shard:
    path: str
    entries: dict[str, tuple]  # name -> (dtype, shape, begin, end), as read_header_streaming
    metadata: dict[str, str]
    start: int

    def order(self) -> list[str]:
        return sorted(self.entries, key=lambda n: self.entries[n][2])


@dataclass
class Checkpoint:
    """The shards of a checkpoint (one for a single file), their headers, and where it came from."""

    source: str
    shards: list[Shard]
    index_path: str | None = None
    index_metadata: dict = field(default_factory=dict)
    folder: str | None = None  # the model folder (config.json and friends), if there is one
    config: dict | None = None  # config.json of the folder, if any

    @property
    def entries(self) -> dict[str, tuple]:
        """{tensor name: (dtype, shape, begin, end)} over every shard."""
        return {n: e for s in self.shards for n, e in s.entries.items()}

    def shard_of(self) -> dict[str, Shard]:
        return {n: s for s in self.shards for n in s.entries}

    @property
    def sharded(self) -> bool:
        return self.index_path is not None

    def files(self) -> list[str]:
        """Every file this checkpoint is read from (shards, the index)."""
        return [s.path for s in self.shards] + ([self.index_path] if self.index_path else [])


def _read_shard(path: str) -> Shard:
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        entries, metadata, start = st.read_header_streaming(fh, path)
    return Shard(path, entries, metadata, start)


def _read_index(path: str) -> tuple[list[Shard], dict]:
    index = read_json(path, CheckpointError, missing="file not found", invalid="corrupt JSON", unique_keys=True)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: not a sharded-checkpoint index: expected an object with a non-empty "
                              "'weight_map' of tensor name -> shard file name")
    folder = os.path.dirname(os.path.abspath(path))
    names: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        if os.path.basename(shard) != shard or shard in (".", ".."):
            raise CheckpointError(f"{path}: tensor {tensor!r} names shard {shard!r}, which is not a file name "
                                  "in the index's folder")
        names.setdefault(shard, []).append(tensor)
    shards = []
    owner: dict[str, str] = {}
    for shard_name in sorted(names):
        shard_path = os.path.join(folder, shard_name)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{path}: shard {shard_name!r} (holding {names[shard_name][0]!r}...) is missing: "
                                  f"{shard_path} not found")
        shard = _read_shard(shard_path)
        for tensor in shard.entries:
            if tensor in owner:
                raise CheckpointError(f"{shard_path}: tensor {tensor!r} is also in {owner[tensor]} (a tensor in "
                                      "two shards)")
            owner[tensor] = shard_path
            if weight_map.get(tensor) != shard_name:
                where = f"the index puts it in {weight_map[tensor]!r}" if tensor in weight_map else \
                    "the index does not name it"
                raise CheckpointError(f"{shard_path}: holds tensor {tensor!r} but {where} ({path}): the shards "
                                      "disagree with the index")
        missing = [t for t in names[shard_name] if t not in shard.entries]
        if missing:
            raise CheckpointError(f"{shard_path}: lacks tensor {missing[0]!r} that the index {path} puts there "
                                  f"({len(missing)} missing): the shards disagree with the index")
        shards.append(shard)
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return shards, meta


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read the headers of the checkpoint at ``path`` (file, index or folder; see the module doc)."""
    path = os.fspath(path)
    folder = None
    if os.path.isdir(path):
        folder = path
        if os.path.isfile(os.path.join(path, INDEX_NAME)):
            target = os.path.join(path, INDEX_NAME)
        elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
            target = os.path.join(path, SINGLE_NAME)
        else:
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(found) != 1:
                raise CheckpointError(f"{path}: a model folder needs {INDEX_NAME}, {SINGLE_NAME} or exactly one "
                                      f"*.safetensors file; found {found or 'none'}")
            target = os.path.join(path, found[0])
    elif not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    else:
        target = path
        sibling = os.path.dirname(os.path.abspath(path))
        if os.path.isfile(os.path.join(sibling, "config.json")):
            folder = sibling
    config = None
    if folder is not None and os.path.isfile(os.path.join(folder, "config.json")):
        config = read_json(os.path.join(folder, "config.json"), CheckpointError, missing="file not found",
                           invalid="corrupt JSON")
        if not isinstance(config, dict):
            raise CheckpointError(f"{os.path.join(folder, 'config.json')}: expected a JSON object")
    if target.endswith(".json"):
        shards, meta = _read_index(target)
        return Checkpoint(path, shards, target, meta, folder, config)
    return Checkpoint(path, [_read_shard(target)], None, {}, folder, config)


def read_tensor(shard: Shard, fh: Any, name: str) -> Any:
    """One tensor of an open shard, as stored (BF16 as uint16 bits)."""
    return st.read_tensor(fh, shard.start, shard.entries[name], name, shard.path)
