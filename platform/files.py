"""Files every stage writes: published whole or not at all, and checksummed the same way everywhere.

A reader must never see half a file or half a folder, whatever moment a crash picks. A local file or
folder is written under a temporary name beside its target and renamed into place (a rename is atomic
on one filesystem). An object store has no rename, but an object appears only when its upload
completes, so there the bytes go straight to the target.

This is also the one filesystem layer of the data side: local paths, gs:// and s3:// all go through
pyarrow's filesystems. Endpoints and credentials come from the standard environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, STORAGE_EMULATOR_HOST, ...), never
from a URI, so a location can be logged, recorded in a manifest or shown in an error without leaking a secret.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from openllama.commands import BadInput, WorkFailed

CHUNK_BYTES = 1 << 20


def is_uri(path: str | Path) -> bool:
    """Whether `path` names a location on some filesystem other than the local one by a scheme (gs://, s3://)."""
    return "://" in str(path)


class CredentialsInLocation(BadInput):
    """A URI that carries a key or options (s3://KEY:SECRET@bucket/..., ?secret_key=): logs would keep them."""


def check_location(location: str | Path) -> str:
    """`location` as a string, refused when its authority holds credentials or its scheme is unknown."""
    location = str(location)
    if is_uri(location):
        scheme, rest = location.split("://", 1)
        if "@" in rest.split("/", 1)[0] or "?" in rest:
            raise CredentialsInLocation(
                f"{scheme}://...: put credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                "GOOGLE_APPLICATION_CREDENTIALS), not in the location, where logs and manifests would keep them")
        if scheme not in SCHEMES:
            raise BadInput(f"{location}: unknown scheme {scheme}://; use a local path, {', '.join(SCHEMES)}://")
    return location


SCHEMES = ("s3", "gs", "gcs", "file")


GCS_EMULATOR = "STORAGE_EMULATOR_HOST"  # the Google client libraries' setting for a GCS emulator's endpoint


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """One filesystem object per bucket: making one can cost a request (S3 resolves the bucket's region)."""
    emulator = os.environ.get(GCS_EMULATOR)
    if scheme in ("gs", "gcs") and emulator:  # pyarrow's GCS client reads no endpoint from the environment
        protocol, _, host = emulator.rpartition("://")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=protocol or "http")
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def filesystem(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a gs://, s3:// or file:// URI."""
    path = check_location(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme, rest = path.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(rest)
    return _bucket_filesystem(scheme, rest.split("/", 1)[0]), rest.rstrip("/")


def check_bucket(location: str) -> None:
    """Fail before any work when the bucket of URI `location` is missing (BadInput) or cannot be reached
    (WorkFailed): a listing of a missing bucket is merely empty, and the first write would fail hours later."""
    scheme, rest = check_location(location).split("://", 1)
    bucket = rest.split("/", 1)[0]
    try:
        found = _bucket_filesystem(scheme, bucket).get_file_info(bucket).type
    except OSError as error:
        reason = " ".join(str(error).split())
        raise WorkFailed(f"{scheme}://{bucket} cannot be reached ({reason}); check the network and the endpoint "
                         "and credentials in the environment (AWS_ENDPOINT_URL, ...)") from None
    if found == pafs.FileType.NotFound:
        raise BadInput(f"{location}: the bucket {scheme}://{bucket} does not exist (or these credentials may not "
                       "see it); create it or choose another location")


def kvstore_spec(location: str | Path) -> dict[str, Any]:
    """The TensorStore kvstore (JSON spec) of a local folder or a bucket prefix, with the endpoint the standard
    environment names (AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, STORAGE_EMULATOR_HOST).

    For what reads and writes through TensorStore's own S3 and GCS drivers (checkpoints), so that each process
    moves only its own bytes and nothing is staged on local disk. Spelled out because TensorStore's S3 driver
    reads no endpoint from the environment, and without a region it asks AWS for the bucket's.
    """
    location = check_location(location)
    if not is_uri(location) or location.startswith("file://"):
        return {"driver": "file", "path": os.path.abspath(location.removeprefix("file://")).rstrip("/") + "/"}
    scheme, rest = location.split("://", 1)
    bucket, _, prefix = rest.partition("/")
    path = prefix.strip("/") + "/" if prefix.strip("/") else ""
    if scheme == "s3":
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path,
                                "aws_region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                                or "us-east-1"}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        if os.environ.get("AWS_ACCESS_KEY_ID"):  # else the default chain: profile, instance metadata
            spec["aws_credentials"] = {"type": "environment"}
        return spec
    emulator = os.environ.get(GCS_EMULATOR)
    if emulator:  # TensorStore's GCS driver takes its endpoint from this variable of its own
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator if "://" in emulator else f"http://{emulator}")
    return {"driver": "gcs", "bucket": bucket, "path": path}


def join(root: str, *parts: str) -> str:
    """`root`/parts for a local path or a URI alike."""
    return "/".join([root.rstrip("/"), *parts])


def kind(location: str | Path) -> pafs.FileType:
    """File, Directory or NotFound (a bucket prefix with objects under it counts as a directory)."""
    fs, path = filesystem(location)
    found = fs.get_file_info(path).type
    if found == pafs.FileType.NotFound and is_uri(location):  # some stores keep no folder markers
        listing = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        return pafs.FileType.Directory if listing else found
    return found


def is_file(location: str | Path) -> bool:
    return kind(location) == pafs.FileType.File


def size_of(location: str | Path) -> int:
    fs, path = filesystem(location)
    return fs.get_file_info(path).size


def files_under(folder: str | Path) -> list[str]:
    """Every file below `folder` (recursively), named the way `folder` was (local path or URI), sorted."""
    folder = check_location(folder)
    fs, path = filesystem(folder)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = folder.split("://", 1)[0] + "://" if is_uri(folder) and not folder.startswith("file://") else ""
    return sorted(prefix + info.path for info in found if info.type == pafs.FileType.File)


def names_in(folder: str | Path) -> list[str]:
    """The names directly inside `folder` (files and folders, not below), sorted; none when it is missing.

    One listing request on S3, where `files_under` would list every object of every step checkpoint.
    """
    fs, path = filesystem(folder)
    if isinstance(fs, pafs.GcsFileSystem):
        # pyarrow's GCS listing reports folders only by their marker objects, and uploads make none: the names
        # come from every object below instead (one request per thousand objects)
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted({info.path[len(path):].lstrip("/").split("/", 1)[0] for info in found})
    found = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(info.base_name for info in found)


def glob_files(pattern: str) -> list[str]:
    """The files matching a shell pattern (`*`, `?`, `[...]`, `**`), local or in a bucket, sorted."""
    pattern = check_location(pattern)
    if not is_uri(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    fixed = re.split(r"[*?\[]", pattern, maxsplit=1)[0].rsplit("/", 1)[0]
    return [p for p in files_under(fixed) if fnmatch.fnmatchcase(p, pattern)]


def open_input(location: str | Path) -> Any:
    """A seekable binary reader of `location`: a ranged read fetches only the bytes asked for."""
    fs, path = filesystem(location)
    return fs.open_input_file(path)


def temporary_name(target: Path) -> Path:
    """A unique hidden sibling of `target`; crashed writers leave these, never a half-written target."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def open_output(target: str | Path) -> Iterator[Any]:
    """A writable stream whose bytes appear at `target` (local path or URI) only when the block succeeds."""
    fs, path = filesystem(target)
    if isinstance(fs, pafs.LocalFileSystem):
        local = Path(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_name(local)
        try:
            with fs.open_output_stream(str(temporary)) as stream:
                yield stream
            os.replace(temporary, local)
        finally:
            temporary.unlink(missing_ok=True)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        yield stream


def write_bytes(target: str | Path, data: bytes) -> None:
    """Publish `data` at `target` (a local path or a URI) whole, replacing what was there."""
    with open_output(target) as stream:
        stream.write(data)


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, value: Any) -> None:
    """`value` as indented JSON with sorted keys (stable bytes for the same value), published whole."""
    write_text(target, json.dumps(value, indent=2, sort_keys=True))


def write_parquet(target: str | Path, table: pa.Table) -> None:
    """`table` as one parquet file, published whole."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(target, sink.getvalue())


def read_parquet(source: str | Path) -> pa.Table:
    """A whole parquet file, read in one request (a bucket's latency, not its bandwidth, bounds a small file)."""
    return pq.read_table(pa.BufferReader(read_bytes(source)))


def read_bytes(source: str | Path) -> bytes:
    fs, path = filesystem(source)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_json(source: str | Path) -> Any:
    return json.loads(read_bytes(source))


def copy_file(source: str | Path, target: str | Path) -> None:
    write_bytes(target, read_bytes(source))


@contextmanager
def new_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """A local folder filled inside the block and renamed to `target` when the block succeeds.

    On an error the temporary folder is removed and `target` is untouched. An existing non-empty
    `target` is an error unless `replace`, when it is swapped out whole after the new one is complete.
    """
    target = Path(target).absolute()
    if target.exists() and any(target.iterdir()) and not replace:
        raise FileExistsError(f"{target} exists and is not empty; choose a new path or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(target)
    temporary.mkdir()
    try:
        yield temporary
        publish_directory(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def publish_directory(complete: Path, target: Path) -> None:
    """Rename the finished folder `complete` to `target`, replacing an older `target` whole.

    For writers that share one temporary folder (every process of a sharded checkpoint writes its part
    into it, and one of them publishes it); `new_directory` is the one-writer form.
    """
    if target.exists():
        old = temporary_name(target)
        target.rename(old)
        complete.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        complete.rename(target)


def remove_temporaries(folder: Path, pattern: str = ".*.tmp-*") -> list[Path]:
    """Remove what crashed writers left in `folder`; returns what was removed."""
    removed = []
    for path in folder.glob(pattern) if folder.is_dir() else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_tree(location: str | Path) -> None:
    """Delete a folder and everything under it, local or a bucket prefix; nothing there is not an error."""
    fs, path = filesystem(location)
    if kind(location) == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)
        try:
            fs.delete_dir(path)
        except FileNotFoundError:  # a prefix of uploaded objects has no folder marker to delete (GCS)
            pass


def copy_tree(source: str | Path, target: str | Path) -> None:
    """Every file below `source` (or the file `source`) to the same place below `target`, between a local
    folder and a bucket either way, several files at a time; files already at `target` are replaced.

    Not atomic: the caller marks the copy complete (a step checkpoint's state.json is written after it).
    """
    source_fs, source_path = filesystem(source)
    target_fs, target_path = filesystem(target)
    if isinstance(target_fs, pafs.LocalFileSystem):  # a single file's folder is not made by copy_files
        os.makedirs(os.path.dirname(target_path), exist_ok=True)
    pafs.copy_files(source_path, target_path, source_filesystem=source_fs, destination_filesystem=target_fs,
                    chunk_size=8 * CHUNK_BYTES)


def remove_file(location: str | Path) -> None:
    """Delete one file, local or in a bucket; nothing there is not an error."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def sha256_of(source: str | Path) -> str:
    """The sha256 of a file, local or on a bucket, read in chunks (a shard can be hundreds of MB)."""
    fs, path = filesystem(source)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
