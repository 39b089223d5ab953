"""Paths that may be local or remote (`gs://`, `s3://`, `memory://`, ... through fsspec).

Local paths stay plain paths (made absolute); a URL with a scheme is kept exactly as given and
opened through fsspec, whose filesystem for the scheme must be installed (gcsfs for gs://,
s3fs for s3://). Corpora, token stores and checkpoints take either.

    with paths.open_file("gs://bucket/corpus/a.jsonl.gz") as f: ...   # bytes, gzip undone
    paths.listdir("gs://bucket/store"), paths.exists(...), paths.join(...)
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil

URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str) -> bool:
    """A path with a scheme (gs://, s3://, file://, memory://): opened through fsspec."""
    return bool(URL.match(str(path)))


def normalize(path: str) -> str:
    """A URL as given; a local path absolute."""
    return str(path) if is_url(path) else os.path.abspath(path)


def filesystem(path: str):
    """(fsspec filesystem, path within it) of a URL or a local path."""
    import fsspec

    return fsspec.core.url_to_fs(normalize(path))


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    """The last name of a local path or a URL (a folder's trailing / ignored)."""
    return str(path).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def dirname(path: str) -> str:
    """The folder a local path or a URL is in."""
    return str(path).rstrip("/").rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)
    return fs.exists(inner)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = filesystem(path)
    return fs.isdir(inner)


def listdir(path: str) -> list[str]:
    """The names (not paths) in a folder, sorted."""
    if not is_url(path):
        return sorted(os.listdir(path))
    fs, inner = filesystem(path)
    return sorted(basename(p) for p in fs.ls(inner, detail=False))


def size_and_version(path: str) -> tuple[int, str]:
    """(bytes, a string that changes when the file does: mtime, or the store's etag / generation)."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, str(st.st_mtime_ns)
    fs, inner = filesystem(path)
    info = fs.info(inner)
    version = next((str(info[k]) for k in ("etag", "generation", "mtime", "LastModified", "created") if k in info), "")
    return int(info.get("size") or 0), version


def open_raw(path: str, mode: str = "rb"):
    """A file object for a local path or a URL (no decompression)."""
    if not is_url(path):
        return open(path, mode)
    fs, inner = filesystem(path)
    return fs.open(inner, mode)


def open_file(path: str):
    """Bytes of a file, gzip undone when its first bytes say so (whatever its name)."""
    with open_raw(path) as f:
        magic = f.read(2)
    raw = open_raw(path)
    return gzip.open(raw, "rb") if magic == b"\x1f\x8b" else raw


CACHE = os.path.join(os.path.expanduser("~"), ".cache", "glm_jax", "remote")


def local_file(path: str, cache_dir: str = CACHE) -> str:
    """A local path for a file: itself when local; a URL's file copied, with the files beside it in
    its folder (a tokenizer.json's sidecars), into `cache_dir` (keyed by the folder's URL and the
    file's version), for readers that need a local file (SentencePiece, tokenizers)."""
    if not is_url(path):
        return path
    folder, name = dirname(path), basename(path)
    size, version = size_and_version(path)
    key = hashlib.sha256(f"{folder}|{size}|{version}".encode()).hexdigest()[:24]
    local = os.path.join(cache_dir, key)
    if not os.path.isfile(os.path.join(local, name)):
        fs, inner = filesystem(folder)
        tmp = f"{local}.{os.getpid()}.tmp"
        os.makedirs(tmp, exist_ok=True)
        for entry in fs.ls(inner, detail=True):
            if entry.get("type") == "file":
                fs.get(entry["name"], os.path.join(tmp, basename(entry["name"])))
        os.makedirs(cache_dir, exist_ok=True)
        if os.path.isdir(local):  # another process copied it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, local)
    return os.path.join(local, name)
