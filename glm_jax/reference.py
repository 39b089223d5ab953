"""The reference model's log-probabilities for freeze / full DPO and IPO, computed once from the
base and kept beside the run, so no second model is held while training.

An adapter method needs none of this: its reference is the frozen base with the adapter off, one
forward per step (`Trainer.with_reference`). Freeze and full train the base's own weights, so
before step 1 (or on a resume that finds no cache) every packed row of the training and held-out
data is scored once by the base (`Trainer.answer_logps`) and the table [rows, S] written to
REFERENCE_DIR/<name>.npy with its key in <name>.json: a hash of the base's identity
(`peft.base_identity`) and of the rows themselves, so another base or other data is recomputed,
never reused. Each row then carries its `ref_logps` through the data pipeline like any field.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from glm_jax import sharding as sh
from glm_jax.checkpoints import sync_processes
from glm_jax.objectives import CONTRACT_KEYS
from glm_jax.pair_objectives import REFERENCE_FIELD
from glm_jax.sft import SFTBuilder


def rows_key(base: dict | None, builder: SFTBuilder) -> str:
    """sha256 of the base's identity and the packed rows' contract arrays, in order."""
    digest = hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode())
    for row in builder.sequences:
        for name in CONTRACT_KEYS:
            digest.update(np.ascontiguousarray(row[name]).tobytes())
    return digest.hexdigest()


def with_reference(builder: SFTBuilder, table: np.ndarray) -> SFTBuilder:
    """The builder's rows with their reference log-probabilities ([rows, S] table) beside them."""
    rows = [{**row, REFERENCE_FIELD: np.asarray(ref, np.float32)} for row, ref in zip(builder.sequences, table)]
    return SFTBuilder(rows, builder.seq_len, builder.seed, builder.stats, builder.shuffle)


def score_rows(trainer, params, builder: SFTBuilder) -> np.ndarray:
    """`trainer.answer_logps` of every row of `builder`, in batches of the trainer's pass ->
    [rows, S] float32, the whole table on every process (collective)."""
    rows, width = len(builder.sequences), builder.seq_len
    held = sh.rows_held(trainer.batch_sharding, trainer.pass_batch)
    table = np.zeros((rows, width), np.float32)
    with trainer.context():
        for start in range(0, rows, trainer.pass_batch):
            index = [start + i for i in held]
            local = {
                name: np.stack([builder.sequences[i][name] if i < rows else np.zeros(width, np.int32) for i in index])
                for name in CONTRACT_KEYS
            }
            scores = trainer.answer_logps(params, trainer.place_batch(local))
            if jax.process_count() > 1:
                scores = multihost_utils.process_allgather(scores, tiled=True)
            scores = np.asarray(scores)
            stop = min(rows - start, trainer.pass_batch)
            table[start : start + stop] = scores[:stop]
    return table


def cached_reference(trainer, params_of_base, builders: dict, folder: str, base: dict | None, log) -> dict:
    """{name: builder or None} -> the same with `ref_logps` in every row: read from folder where
    its key matches, else scored by the base (`params_of_base()`: its trainable part, placed, asked
    for only when something must be scored) and written there by process 0."""
    out, params = {}, None
    for name, builder in builders.items():
        if builder is None:
            out[name] = None
            continue
        key = rows_key(base, builder)
        table_path, key_path = os.path.join(folder, f"{name}.npy"), os.path.join(folder, f"{name}.json")
        if _stored_key(key_path) == key:
            table = np.load(table_path)
            log(f"reference log-probabilities: {name} read from {table_path}")
        else:
            params = params_of_base() if params is None else params
            table = score_rows(trainer, params, builder)
            if jax.process_index() == 0:
                _write(folder, table_path, key_path, table, key)
            sync_processes(f"reference {table_path}")
            log(f"reference log-probabilities: {name} scored by the base ({len(table)} rows) into {table_path}")
        out[name] = with_reference(builder, table)
    return out


def _stored_key(path: str) -> str | None:
    try:
        with open(path) as f:
            return json.load(f).get("key")
    except (OSError, ValueError):
        return None


def _write(folder: str, table_path: str, key_path: str, table: np.ndarray, key: str) -> None:
    """The table, then its key (the key last: a killed write is recomputed, never trusted)."""
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(key_path):
        os.remove(key_path)
    tmp = table_path + ".tmp.npy"
    np.save(tmp, table)
    os.replace(tmp, table_path)
    with open(key_path + ".tmp", "w") as f:
        json.dump({"key": key, "rows": int(table.shape[0]), "seq_len": int(table.shape[1])}, f)
    os.replace(key_path + ".tmp", key_path)
