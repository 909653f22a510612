"""A cache on S3-compatible object storage, addressed like a local directory.

``S3Path`` stands where a ``pathlib.Path`` to the cache would: ``/`` makes the key of a file inside
it, ``read_bytes``/``is_file`` read one object, ``list_sizes`` lists every object under a prefix.
The readers then work on either kind of location with the same code (``cache_root`` picks one);
arrays are read through tensorstore's ``s3`` kvstore (``kvstore_spec``).

Credentials and endpoint come the standard way, for boto3 and tensorstore alike: the
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``) and ``AWS_REGION`` environment
variables, and ``AWS_ENDPOINT_URL`` for an S3-compatible store other than AWS.

The boto3 client is made once per process and never pickled: an ``S3Path`` travels to DataLoader
workers and spawned processes as plain text.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path, PurePosixPath

from cache_schema.errors import CacheError

SCHEME = "s3://"
_clients: dict[int, object] = {}
_lock = threading.Lock()


def is_s3(location) -> bool:
    """Whether ``location`` names an S3 prefix. ``Path("s3://b/p")`` collapses the double slash to
    ``s3:/b/p`` (a command-line option typed as a path), so that spelling counts too."""
    if isinstance(location, S3Path):
        return True
    text = str(location)
    return text.startswith("s3:/")


def cache_root(location) -> Path | S3Path:
    """The cache at ``location`` as a ``Path`` (local directory) or an ``S3Path``."""
    if isinstance(location, (Path, S3Path)) and not is_s3(location):
        return location
    return S3Path.parse(location) if is_s3(location) else Path(location)


def local_path(location) -> Path:
    """``location`` (a cache or a file in it) as a local path, for code that writes in place; S3 caches
    are written locally and then uploaded, so an S3 location here is refused."""
    path = cache_root(location)
    if isinstance(path, S3Path):
        raise CacheError(f"{path}: object storage is not written in place; write the cache to a local "
                         "directory, then upload it with `repa cache push`")
    return path


def client():
    """This process's boto3 S3 client (AWS_ENDPOINT_URL, credentials and region from the environment)."""
    pid = os.getpid()
    with _lock:
        if pid not in _clients:
            import boto3
            from botocore.config import Config

            # Enough connections for the thread pools that read records and upload parts.
            _clients.clear()
            _clients[pid] = boto3.session.Session().client(
                "s3", config=Config(max_pool_connections=32, retries={"max_attempts": 5, "mode": "standard"}))
        return _clients[pid]


def _read_error(where, error) -> CacheError:
    """A failed read as one line: a refused request (credentials), or no answer at all (the endpoint)."""
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        return CacheError(f"{where}: cannot be read ({error}); check the credentials and AWS_ENDPOINT_URL")
    return CacheError(f"{where}: cannot be reached ({error}); check AWS_ENDPOINT_URL")


def _not_found(error) -> bool:
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class S3Path:
    """The key ``key`` in bucket ``bucket``, read like a file or listed like a directory."""

    __slots__ = ("bucket", "key")

    def __init__(self, bucket: str, key: str = ""):
        self.bucket, self.key = bucket, key.strip("/")

    @classmethod
    def parse(cls, location) -> S3Path:
        if isinstance(location, S3Path):
            return location
        text = str(location)
        if not text.startswith("s3:/"):
            raise CacheError(f"{text}: not an S3 location; write it as s3://bucket/prefix")
        bucket, _, key = text[len("s3:/"):].lstrip("/").partition("/")
        if not bucket:
            raise CacheError(f"{text}: no bucket; write it as s3://bucket/prefix")
        return cls(bucket, key)

    # -- path arithmetic --------------------------------------------------------------------------
    def __truediv__(self, rel) -> S3Path:
        rel = str(rel).strip("/")
        return S3Path(self.bucket, f"{self.key}/{rel}" if self.key else rel)

    def joinpath(self, *parts) -> S3Path:
        out = self
        for p in parts:
            out = out / p
        return out

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def parent(self) -> S3Path:
        return S3Path(self.bucket, str(PurePosixPath(self.key).parent).lstrip("."))

    def relative_to(self, other: S3Path) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key) if other.key else PurePosixPath(self.key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, S3Path) and (self.bucket, self.key) == (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((self.bucket, self.key))

    def __getstate__(self):
        return (self.bucket, self.key)

    def __setstate__(self, state):
        self.bucket, self.key = state

    # -- reading ----------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        """The object's bytes; FileNotFoundError when there is none, OSError when S3 cannot be reached."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return client().get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        except ClientError as e:
            if _not_found(e):
                raise FileNotFoundError(f"{self}: no such object") from None
            raise OSError(f"{self}: {e}") from None
        except BotoCoreError as e:
            raise OSError(f"{self}: {e}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def is_file(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client().head_object(Bucket=self.bucket, Key=self.key)
            return True
        except (ClientError, BotoCoreError) as e:
            if _not_found(e):
                return False
            raise _read_error(self, e) from None

    def is_dir(self) -> bool:
        """Whether any object lies under this prefix (S3 has no empty directories)."""
        return bool(self.list_sizes(limit=1))

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def list_sizes(self, limit: int | None = None) -> dict[str, int]:
        """Every object under this prefix: its key relative to it (``/``-separated) -> bytes."""
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = f"{self.key}/" if self.key else ""
        out: dict[str, int] = {}
        try:
            pages = client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"MaxItems": limit} if limit else {})
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(prefix):]] = obj["Size"]
        except (ClientError, BotoCoreError) as e:
            raise CacheError(f"{self}: cannot be listed ({e}); check the bucket name, the credentials and "
                             "AWS_ENDPOINT_URL") from None
        return out


def kvstore_spec(path: Path | S3Path) -> dict:
    """tensorstore's kvstore for the array (directory or prefix) at ``path``."""
    if not isinstance(path, S3Path):
        return {"driver": "file", "path": str(path)}
    spec = {"driver": "s3", "bucket": path.bucket, "path": f"{path.key}/"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


# -- conditional writes: what makes several writers on one prefix safe ------------------------------
def _code(error) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def lost_race(error) -> bool:
    """412: the object exists (If-None-Match) or changed (If-Match); 409: a concurrent conditional write."""
    return _code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _write_error(dest: S3Path, e) -> CacheError:
    return CacheError(f"{dest}: cannot be written ({e}); check the credentials and AWS_ENDPOINT_URL")


def put_if_absent(dest: S3Path, data: bytes) -> bool:
    """Create ``dest`` with ``data`` unless an object is there (one conditional PUT): whether it was created."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client().put_object(Bucket=dest.bucket, Key=dest.key, Body=data, IfNoneMatch="*")
        return True
    except ClientError as e:
        if lost_race(e):
            return False
        raise _write_error(dest, e) from None
    except BotoCoreError as e:
        raise _write_error(dest, e) from None


def put_if_match(dest: S3Path, data: bytes, etag: str) -> str | None:
    """Replace ``dest`` with ``data`` only if it still has ``etag``: its new etag, or None when it changed."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client().put_object(Bucket=dest.bucket, Key=dest.key, Body=data, IfMatch=etag)["ETag"]
    except ClientError as e:
        if lost_race(e) or _not_found(e):
            return None
        raise _write_error(dest, e) from None
    except BotoCoreError as e:
        raise _write_error(dest, e) from None


def get_with_etag(src: S3Path) -> tuple[bytes, str] | None:
    """The object's bytes and etag (one GET), or None when there is none."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        out = client().get_object(Bucket=src.bucket, Key=src.key)
        return out["Body"].read(), out["ETag"]
    except (ClientError, BotoCoreError) as e:
        if _not_found(e):
            return None
        raise _read_error(src, e) from None


def delete(dest: S3Path) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client().delete_object(Bucket=dest.bucket, Key=dest.key)
    except (ClientError, BotoCoreError) as e:
        raise CacheError(f"{dest}: cannot be deleted ({e}); check the credentials and AWS_ENDPOINT_URL") from None
