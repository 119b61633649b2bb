"""One storage layer for every artifact path: fsspec URIs, atomic commits, safe ids.

Layout under the store root::

    artifacts/<stage>/<item_id>/<item_key[:20]>/<name>

The item key (see ``talkforge.engine``) changes with inputs, code version, config and
model fingerprints, so every version gets its own folder and old versions stay readable.
A file becomes visible under its final name only by rename from a temporary name in the
same folder, and only then is it recorded in the catalog: nothing half-written ever looks
done. Local paths and ``file://`` URIs work now; other fsspec protocols (``s3://``) use the
same code path through ``fsspec``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

import fsspec
from pydantic import BaseModel, ConfigDict

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,159}$")


class UnsafeIdError(ValueError):
    """An id that would escape its folder or is not a plain file name."""


def safe_id(raw: str) -> str:
    """Return ``raw`` if it is safe as one path component, else raise :class:`UnsafeIdError`.

    Allowed: letters, digits, ``.``, ``_``, ``-``; must start with a letter or digit; no
    ``..``; at most 160 characters. Ids are validated, never silently rewritten, so two
    different raw ids can never collide on disk.
    """
    if not isinstance(raw, str) or not _SAFE_ID.match(raw) or ".." in raw:
        raise UnsafeIdError(f"unsafe id {raw!r}: use letters, digits, '.', '_', '-' only")
    return raw


class ArtifactRef(BaseModel):
    """A committed artifact: where it is and what its bytes hash to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact_id: str
    kind: str
    name: str
    uri: str
    size_bytes: int
    sha256: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def artifact_id_for(stage: str, item_id: str, item_key: str, name: str) -> str:
    """Artifact ids derive from the item key, so the same inputs always name the same artifact."""
    return hashlib.sha256(f"{stage}/{item_id}/{item_key}/{name}".encode()).hexdigest()[:32]


class ArtifactStore:
    """Reads and atomically writes artifacts under one root URI."""

    def __init__(self, root_uri: str):
        self.root_uri = root_uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.root_uri)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols

    def uri_for(self, stage: str, item_id: str, item_key: str, name: str) -> str:
        parts = [safe_id(stage), safe_id(item_id), safe_id(item_key[:20]), safe_id(name)]
        return f"{self.root_uri}/artifacts/" + "/".join(parts)

    def _path(self, uri: str) -> str:
        return fsspec.core.url_to_fs(uri)[1]

    def commit_file(
        self, src: Path, stage: str, item_id: str, item_key: str, name: str, kind: str
    ) -> ArtifactRef:
        """Move ``src`` to its final location atomically and describe it."""
        uri = self.uri_for(stage, item_id, item_key, name)
        final = self._path(uri)
        digest = sha256_file(src)
        size = src.stat().st_size
        parent = final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        if self.is_local:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:
            self.fs.put_file(str(src), tmp)
            self.fs.mv(tmp, final)
        return ArtifactRef(
            artifact_id=artifact_id_for(stage, item_id, item_key, name),
            kind=kind,
            name=name,
            uri=uri,
            size_bytes=size,
            sha256=digest,
        )

    def local_path(self, uri: str, cache_dir: Path) -> Path:
        """A local file for ``uri``: the file itself when local, else a copy in ``cache_dir``."""
        path = self._path(uri)
        if self.is_local:
            return Path(path)
        dest = cache_dir / path.rsplit("/", 1)[-1]
        self.fs.get_file(path, str(dest))
        return dest

    def exists(self, uri: str) -> bool:
        return self.fs.exists(self._path(uri))

    def describe(
        self, stage: str, item_id: str, item_key: str, name: str, kind: str
    ) -> ArtifactRef | None:
        """The ref of an artifact already committed under these names (None when absent).

        Size and sha256 are measured on the stored bytes, so the ref is exactly what
        :meth:`commit_file` returned when it was committed (e.g. a shared raw download).
        """
        uri = self.uri_for(stage, item_id, item_key, name)
        path = self._path(uri)
        if not self.fs.exists(path):
            return None
        if self.is_local:
            digest = sha256_file(Path(path))
        else:
            h = hashlib.sha256()
            with self.fs.open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            digest = h.hexdigest()
        return ArtifactRef(
            artifact_id=artifact_id_for(stage, item_id, item_key, name),
            kind=kind,
            name=name,
            uri=uri,
            size_bytes=int(self.fs.size(path)),
            sha256=digest,
        )

    def verify(self, ref: ArtifactRef) -> bool:
        """True when the stored bytes still hash to the recorded checksum."""
        path = self._path(ref.uri)
        if not self.fs.exists(path):
            return False
        if self.is_local:
            return sha256_file(Path(path)) == ref.sha256
        h = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest() == ref.sha256
