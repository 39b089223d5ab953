"""What a checkpoint layout of another family is: `Layout` (one per module `layout_llama.py`,
`layout_bloom.py`, `layout_opt.py`, `layout_thudm_glm.py`; `layouts.py` lists them) and `Renamed`.

A `Layout` says how to recognise a folder's config.json, turn it into a GLMConfig, name its tensors
(`convert.Rule` tables over the canonical names: those `save_pretrained` of the *ForCausalLM class
writes) and write our parameters back. Released files that name tensors differently (BLOOM's
without `transformer.`, OPT's without `model.`, a bare `LlamaModel` without `model.`) are read
through `Renamed`, which maps each name to its canonical form with the layout's `canonical`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from glm_jax.config import GLMConfig


class ExportError(ValueError):
    """A model a layout cannot hold (export.py raises it too); the message names the fields."""


def check_block(config: GLMConfig, want: Mapping[str, Any], error: type[Exception], what: str) -> None:
    """Raise `error` naming every field of `config` that differs from `want` (field -> value):
    "this model does not have <what>: field=value (needs value), ..."."""
    bad = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in want.items() if getattr(config, k) != v]
    if bad:
        raise error(f"this model does not have {what}: " + ", ".join(bad))


def leaf_at(tree: Mapping, path: tuple[str, ...]):
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str  # the layout, and export.py's --format
    families: tuple[str, ...]  # families a folder of this layout may be read as; the first is the default
    matches: Callable[[dict], bool]  # config.json -> whether this layout holds it
    config_from: Callable[..., GLMConfig]  # (config.json dict, **GLMConfig overrides) -> GLMConfig
    rules: Callable[[GLMConfig], tuple[list, list]]  # -> (per-layer rules, top-level rules), canonical names
    canonical: Callable[[str], str] = lambda name: name  # a released file's tensor name -> the canonical one
    # (float params, config, numpy dtype, tokenizer SpecialIds or None) -> ({canonical name: array}, config.json)
    export: Callable[[dict, GLMConfig, Any, Any], tuple[dict[str, np.ndarray], dict]] | None = None
    family_of: Callable[[dict], str] | None = None  # config.json -> the detected family (default: families[0])


class Renamed(Mapping):
    """A tensor mapping seen under canonical names (`Layout.canonical`), lazily: shapes, file
    locations and the read order of a `released.ShardedTensors` pass through."""

    def __init__(self, tensors: Mapping[str, Any], canonical: Callable[[str], str]):
        self.tensors = tensors
        self.source = {canonical(name): name for name in tensors}

    def __getitem__(self, name: str):
        return self.tensors[self.source[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def __contains__(self, name) -> bool:
        return name in self.source

    def shape_of(self, name: str) -> tuple[int, ...]:
        shape_of = getattr(self.tensors, "shape_of", lambda n: tuple(self.tensors[n].shape))
        return shape_of(self.source[name])

    def where(self, name: str) -> str:
        return getattr(self.tensors, "where", lambda n: "")(self.source[name])

    def dtype_of(self, name: str) -> str:
        return self.tensors.dtype_of(self.source[name])

    def read_order(self) -> list[str]:
        canonical = {source: name for name, source in self.source.items()}
        order = getattr(self.tensors, "read_order", lambda: list(self.tensors))()
        return [canonical[n] for n in order]
