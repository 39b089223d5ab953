"""Corpus files as rows of text: JSON lines (plain or gzip), Parquet, Arrow (Hugging Face `datasets`
folders saved with `save_to_disk`), local or URLs, read by row range.

    inputs = expand_inputs(["gs://bucket/c4", "wiki.parquet", "hf_saved_dataset/"])
    rows = count_rows(inputs[0], "text")                 # rows, and where row k starts in bytes
    for text in iter_texts(inputs[0], 0, 1000, "text", stats): ...

A row is a line of a JSON-lines file or a row of a table. Rows that hold no usable text are
skipped and counted in `stats` (data.ReadStats) exactly as `data.read_texts` counts them, so a
file reads to the same documents here as there: malformed JSON, non-UTF-8 bytes, a line that is
not a JSON object (`bad_json`, `bad_utf8`), a missing or non-string field (`missing_text`), empty
or blank text (`empty_text`). A file's kind comes from its bytes (Parquet's `PAR1`, gzip's magic,
Arrow's stream or file header), whatever its name; inside folders only files named *.jsonl,
*.jsonl.gz, *.parquet or *.arrow are taken, with `datasets` folders (state.json, or a
dataset_dict.json of splits) read through their Arrow files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from glm_jax import paths
from glm_jax.data import ReadStats, line_record, usable_text
from glm_jax.token_store import StoreError

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".arrow")
KINDS = ("jsonl", "jsonl.gz", "parquet", "arrow")
CHUNK = 1 << 22  # bytes per read when counting lines


@dataclasses.dataclass(frozen=True)
class Input:
    """One corpus file: its path (local, absolute, or a URL) and kind (one of KINDS)."""

    path: str
    kind: str


# ---- which files ------------------------------------------------------------------------------------
def detect_kind(path: str) -> str:
    with paths.open_raw(path) as f:
        head = f.read(8)
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:2] == b"\x1f\x8b":
        return "jsonl.gz"
    if head[:6] == b"ARROW1" or head[:4] == b"\xff\xff\xff\xff":
        return "arrow"
    return "jsonl"


def _json(path: str) -> dict:
    with paths.open_raw(path) as f:
        return json.loads(f.read())


def _datasets_folder(path: str, names: list[str]) -> list[Input] | None:
    """The Arrow files of a `save_to_disk` folder (a Dataset, or a DatasetDict's splits in order)."""
    if "state.json" in names:
        state = _json(paths.join(path, "state.json"))
        files = [d["filename"] for d in state.get("_data_files", [])]
        return [Input(paths.join(path, f), "arrow") for f in files]
    if "dataset_dict.json" in names:
        splits = _json(paths.join(path, "dataset_dict.json")).get("splits", [])
        return [i for s in splits for i in _folder(paths.join(path, s))]
    return None


def _folder(path: str) -> list[Input]:
    names = paths.listdir(path)
    found = _datasets_folder(path, names)
    if found is not None:
        return found
    out = []
    for name in names:
        if name.startswith((".", "_")):
            continue
        full = paths.join(path, name)
        if paths.isdir(full):
            out += _folder(full)
        elif name.endswith(SUFFIXES):
            out.append(Input(full, detect_kind(full)))
    return out


def expand_inputs(items: Sequence[str]) -> list[Input]:
    """Files and folders (local or URLs) -> the corpus files in them, in a fixed order: the
    arguments' order, each folder's names sorted (subfolders walked)."""
    out: list[Input] = []
    for item in items:
        path = paths.normalize(item)
        if not paths.exists(path):
            raise StoreError(f"input {item} not found")
        if paths.isdir(path):
            got = _folder(path)
            if not got:
                raise StoreError(
                    f"folder {item} holds no {', '.join('*' + s for s in SUFFIXES)} file and no `datasets` folder"
                )
            out += got
        else:
            out.append(Input(path, detect_kind(path)))
    seen = set()
    for inp in out:
        if inp.path in seen:
            raise StoreError(f"input {inp.path} is given twice (directly or through a folder)")
        seen.add(inp.path)
    if not out:
        raise StoreError("no input given: pass --input FILE_OR_FOLDER")
    return out


# ---- rows -------------------------------------------------------------------------------------------
def _jsonl_text(raw: bytes, field: str, stats: ReadStats) -> str | None:
    """One line's text, or None with the reason counted (data.read_texts' rules)."""
    record = line_record(raw, stats)
    return None if record is None else usable_text(record.get(field), stats)


def _jsonl_lines(inp: Input, start: int, stop: int, offset: int | None) -> Iterator[bytes]:
    with paths.open_file(inp.path) as f:
        if offset is not None and inp.kind == "jsonl":
            f.seek(offset)
            lines = iter(f)
        else:  # a gzip stream cannot seek: read through the rows before `start`
            lines = itertools.islice(f, start, None)
        yield from itertools.islice(lines, stop - start)


def _open_arrow(inp: Input):
    import pyarrow as pa

    source = paths.open_raw(inp.path) if paths.is_url(inp.path) else pa.memory_map(inp.path)
    if source.read(6) == b"ARROW1":
        source.seek(0)
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    source.seek(0)
    reader = pa.ipc.open_stream(source)
    return reader.schema, iter(reader)


def _check_field(inp: Input, names: list[str], field: str) -> None:
    if field not in names:
        raise StoreError(f"{inp.path} has no column {field!r} (columns: {', '.join(names)}); pass --field NAME")


def _table_batches(inp: Input, field: str):
    """(batches(start, stop) -> (first row, record batch of the `field` column) for the batches
    that hold rows [start, stop); the row count when the metadata has it, else None)."""
    if inp.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(paths.open_raw(inp.path) if paths.is_url(inp.path) else inp.path)
        _check_field(inp, pf.schema_arrow.names, field)
        groups = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        firsts = np.concatenate([[0], np.cumsum(groups)]).astype(int).tolist()

        def batches(start: int, stop: int):
            for g, first in enumerate(firsts[:-1]):
                if firsts[g + 1] <= start or first >= stop:
                    continue  # a row group outside the range is never read
                row = first
                for batch in pf.iter_batches(row_groups=[g], columns=[field], batch_size=4096):
                    yield row, batch
                    row += batch.num_rows

        return batches, firsts[-1]
    schema, it = _open_arrow(inp)
    _check_field(inp, schema.names, field)

    def arrow_batches(start: int, stop: int):
        row = 0
        for batch in it:
            if row >= stop:
                break
            if row + batch.num_rows > start:
                yield row, batch.select([field])
            row += batch.num_rows

    return arrow_batches, None


def _table_values(inp: Input, start: int, stop: int, field: str) -> Iterator:
    batches, _ = _table_batches(inp, field)
    for first, batch in batches(start, stop):
        lo, hi = max(start - first, 0), min(stop - first, batch.num_rows)
        yield from batch.column(0).slice(lo, hi - lo).to_pylist()


def iter_texts(
    inp: Input, start: int, stop: int, field: str, stats: ReadStats, offset: int | None = None
) -> Iterator[str]:
    """The usable texts of rows [start, stop) of a file (`offset`: where row `start` begins in a
    plain JSON-lines file, from `count_rows`); every row read is counted in `stats.lines`."""
    try:
        if inp.kind.startswith("jsonl"):
            for raw in _jsonl_lines(inp, start, stop, offset):
                stats.lines += 1
                text = _jsonl_text(raw, field, stats)
                if text is not None:
                    yield text
        else:
            for value in _table_values(inp, start, stop, field):
                stats.lines += 1
                text = usable_text(value, stats)
                if text is not None:
                    yield text
    except StoreError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as e:  # a truncated gzip, a damaged Parquet / Arrow file
        raise StoreError(f"{inp.path}: cannot read rows {start}..{stop} ({type(e).__name__}: {e})") from None


def count_rows(inp: Input, field: str, every: int | None = None) -> tuple[int, list[int] | None]:
    """(rows of a file, byte offsets where rows every, 2*every, ... start in a plain JSON-lines
    file, else None). Tables give their count from metadata; JSON lines are scanned."""
    try:
        if inp.kind.startswith("jsonl"):
            return _count_lines(inp, every if inp.kind == "jsonl" else None)
        batches, rows = _table_batches(inp, field)
        if rows is None:
            rows = sum(b.num_rows for _, b in batches(0, 1 << 62))
        return rows, None
    except StoreError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise StoreError(f"{inp.path}: cannot read it ({type(e).__name__}: {e})") from None


def _count_lines(inp: Input, every: int | None) -> tuple[int, list[int] | None]:
    """Lines as `for line in file` sees them (the last may lack its newline), and the offsets."""
    newlines, pos, last = 0, 0, b"\n"
    offsets: list[int] | None = [] if every else None
    with paths.open_file(inp.path) as f:
        while chunk := f.read(CHUNK):
            at = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            while every and (want := (len(offsets) + 1) * every - 1) < newlines + len(at):
                offsets.append(pos + int(at[want - newlines]) + 1)  # row `want + 1` starts after it
            newlines += len(at)
            pos += len(chunk)
            last = chunk[-1:]
    rows = newlines + (last != b"\n")
    if offsets is not None:
        offsets = [o for o in offsets if o < pos]  # the offset after the final newline starts no row
    return rows, offsets
