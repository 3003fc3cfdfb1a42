"""The artifact: what `graphpress compile` writes and `graphpress.runtime.load` reads.

An artifact is one directory, or one `.tar` of that directory's files:

    lib.so          the compiled library (host code, plus PTX device code for cuda)
    model.onnx.gz   the ONNX model the library was compiled from (after any pipeline), gzip-compressed
    metadata.json   inputs/outputs (names, shapes, dtypes), target, pipeline, versions, and the
                    sha256 of every other file

Writing is atomic: files are built in a hidden staging directory beside the destination, then
renamed into place, so a crash never leaves a half-written artifact under the requested name.
Reading verifies the checksums and refuses missing, altered or unexpected files. The checksums
catch corruption and incomplete copies; they are not a signature against deliberate tampering
of metadata.json itself.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError

FORMAT = "graphpress-artifact"
FORMAT_VERSION = 1
METADATA = "metadata.json"
LIBRARY = "lib.so"
MODEL = "model.onnx.gz"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactWriter:
    """Stage an artifact's files in a temporary directory, then `commit` it atomically.

        with ArtifactWriter("out/model-x86") as w:
            executable.export_library(str(w.path(LIBRARY)))
            w.write_model(proto_bytes)
            w.commit(metadata)
    """

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output)
        self.as_tar = self.output.suffix == ".tar"
        _check_replaceable(self.output, self.as_tar)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.", dir=self.output.parent))
        os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp makes it private; artifacts are ordinary files

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_model(self, model_bytes: bytes) -> None:
        with gzip.open(self.path(MODEL), "wb", compresslevel=6) as f:
            f.write(model_bytes)

    def commit(self, metadata: dict) -> Path:
        """Record checksums, write metadata.json and move the artifact to its destination."""
        files = sorted(p.name for p in self.staging.iterdir())
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "library": LIBRARY, "model": MODEL,
                    **metadata,
                    "files": {name: sha256(self.staging / name) for name in files}}
        self.path(METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        if self.as_tar:
            self._commit_tar()
        else:
            self._commit_dir()
        return self.output

    def _commit_tar(self) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.output.name}.", suffix=".part", dir=self.output.parent)
        os.close(fd)
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            with tarfile.open(tmp, "w") as tar:
                for name in sorted(p.name for p in self.staging.iterdir()):
                    tar.add(self.staging / name, arcname=name)
            os.replace(tmp, self.output)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _commit_dir(self) -> None:
        replace_dir(self.staging, self.output)


def replace_dir(staging: Path, output: Path) -> None:
    """Move a finished directory to `output`, replacing an earlier one with two renames."""
    if not output.exists():
        os.rename(staging, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
    os.rename(output, old / "previous")
    os.rename(staging, output)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_replaceable(output: Path, as_tar: bool) -> None:
    """Only an earlier artifact may be overwritten, never an unrelated file or directory."""
    if not output.exists():
        return
    if as_tar and output.is_file():
        return
    if not as_tar and output.is_dir() and (output / METADATA).is_file():
        return
    raise BackendError(f"{output}: exists and is not a graphpress artifact; refusing to overwrite it")


@dataclass
class OpenedArtifact:
    """A verified artifact's directory and metadata (`tmp` holds an unpacked .tar while in use)."""

    directory: Path
    metadata: dict
    tmp: tempfile.TemporaryDirectory | None = None

    @property
    def library(self) -> Path:
        return self.directory / self.metadata["library"]

    def model_bytes(self) -> bytes:
        with gzip.open(self.directory / self.metadata["model"], "rb") as f:
            return f.read()


def open_artifact(path: str | os.PathLike) -> OpenedArtifact:
    """Open (unpacking a .tar into a temporary directory) and verify an artifact."""
    path = Path(path)
    if not path.exists():
        raise BackendError(f"{path}: no such artifact")
    if path.is_dir():
        return OpenedArtifact(path, verify(path))
    if not tarfile.is_tarfile(path):
        raise BackendError(f"{path}: not an artifact (neither a directory nor a .tar)")
    tmp = tempfile.TemporaryDirectory(prefix="graphpress-artifact-")
    try:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if not member.isfile() or "/" in member.name or member.name in ("", ".", ".."):
                    raise BackendError(f"{path}: unexpected entry {member.name!r} in the artifact .tar")
            tar.extractall(tmp.name, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        tmp.cleanup()
        raise BackendError(f"{path}: the artifact .tar is damaged ({exc})") from exc
    except BackendError:
        tmp.cleanup()
        raise
    try:
        return OpenedArtifact(Path(tmp.name), verify(Path(tmp.name), shown_as=path), tmp)
    except BackendError:
        tmp.cleanup()
        raise


def verify(directory: Path, shown_as: Path | None = None) -> dict:
    """Check metadata.json and every file's sha256; return the metadata or raise BackendError."""
    where = shown_as or directory
    meta_path = directory / METADATA
    if not meta_path.is_file():
        raise BackendError(f"{where}: not a graphpress artifact, or incomplete (no {METADATA})")
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackendError(f"{where}: {METADATA} is damaged ({exc})") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise BackendError(f"{where}: {METADATA} does not describe a graphpress artifact")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise BackendError(f"{where}: artifact format version {metadata.get('format_version')} is not "
                           f"{FORMAT_VERSION}; recompile it with this graphpress")
    files = metadata.get("files")
    if not isinstance(files, dict) or metadata.get("library") not in files or metadata.get("model") not in files:
        raise BackendError(f"{where}: {METADATA} lacks the file list or names no library/model")
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise BackendError(f"{where}: incomplete artifact, {name} is missing")
        if sha256(file) != expected:
            raise BackendError(f"{where}: {name} does not match its checksum (corrupted or modified); refusing to load")
    extra = sorted(p.name for p in directory.iterdir() if p.name != METADATA and p.name not in files)
    if extra:
        raise BackendError(f"{where}: unexpected file(s) not covered by checksums: {', '.join(extra)}")
    return metadata
