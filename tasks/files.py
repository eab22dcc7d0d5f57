"""The files phases hand each other, in a local folder or an object store (`s3://bucket/prefix`), through fsspec.

A location is a string: a local path or a URL. Writes never leave a half-written file where a reader looks: on disk
the bytes go to a temporary name beside the final one, complete and flushed, and then take its name; on an object
store one upload, which the store shows only once it is complete (S3's PUT and multipart upload are atomic).
"""

from __future__ import annotations

import io
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem


def is_local(location: str) -> bool:
    return fsspec.core.split_protocol(str(location))[0] in (None, "file", "local")


def absolute(location: str) -> str:
    """A local folder as an absolute path (relative ones are under the working folder); a URL as it is."""
    return str(Path(location.removeprefix("file://")).resolve()) if is_local(location) else location


def join(location: str, *names: str) -> str:
    return "/".join([str(location).rstrip("/"), *names])


def name_of(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _fs(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(str(location))


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def torch_load(data: bytes, map_location: str | None = None) -> Any:
    """Tensors and plain containers only (`weights_only=True`): stored state never runs code."""
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def read_bytes(location: str) -> bytes:
    """The file's bytes; FileNotFoundError when there is none."""
    fs, path = _fs(location)
    return fs.cat_file(path)


def exists(location: str) -> bool:
    fs, path = _fs(location)
    return fs.exists(path)


def remove(location: str) -> None:
    fs, path = _fs(location)
    if fs.exists(path):
        fs.rm_file(path)


def move(source: str, target: str) -> None:
    """Give `source` the name `target` (replacing it): os.replace on disk, copy and delete on an object store."""
    fs, source_path = _fs(source)
    if isinstance(fs, LocalFileSystem):
        os.replace(source_path, _fs(target)[1])
    else:
        fs.mv(source_path, _fs(target)[1])


def listing(pattern: str) -> list[str]:
    """The locations matching a glob pattern, as locations (URLs on an object store), read afresh: another process
    or host may have written since this one last looked."""
    fs, path = _fs(pattern)
    fs.invalidate_cache()
    found = fs.glob(path)
    return [str(item) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(item) for item in found]


def write_atomically(location: str, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a partial one."""
    fs, path = _fs(location)
    fs.makedirs(fs._parent(path), exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)  # the store makes the object visible only once the upload is complete
        return
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


@contextmanager
def local_copy(location: str, data: bytes) -> Iterator[Path]:
    """A local file with `location`'s name and these bytes, for APIs that take a path (MLflow's log_artifact):
    the file itself when it is local."""
    if is_local(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name_of(location)
        path.write_bytes(data)
        yield path
