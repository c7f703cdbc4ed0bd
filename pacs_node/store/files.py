"""Instance and result files: atomic writes (temp + fsync + rename) under paths built from checked UIDs."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Sequence

from ..errors import InvalidInstance

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TEMP_SUFFIX = ".partial"


def check_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a UID string, or raise InvalidInstance naming the attribute.

    Only digits and dots are accepted, so a UID can never steer a path (no '/', '..', NUL).
    """
    uid = str(value or "").strip().rstrip("\x00")
    if not uid:
        raise InvalidInstance(f"{keyword} is missing or empty")
    if len(uid) > 64:
        raise InvalidInstance(f"{keyword} is longer than 64 characters")
    if not _UID_RE.match(uid):
        raise InvalidInstance(f"{keyword} is not a valid UID (only digits and dots allowed)")
    return uid


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write ``data`` so that ``path`` holds either the old content or all of the new one.

    ``sync_dir=False`` leaves the folder's fsync to the caller (one for many files).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


_SYNC_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_SYNC


def _write_all(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write ``parts`` one after the other (one writev, more only after a short write)."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


def write_new(path: Path, data: bytes | memoryview) -> None:
    """Create ``path`` (which must not exist) holding ``data``, durably: opened with O_SYNC
    and written in one call, which syncs data and size as fsync would, without the temp file
    and rename of write_atomic. For files in a folder nobody reads before it is complete and
    its own fsync is done (a job's result folder); the caller fsyncs the folder."""
    fd = os.open(path, _SYNC_NEW, 0o644)
    try:
        _write_all(fd, [data])
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


class FileStore:
    """Layout: <root>/instances/<study>/<series>/<sop>.dcm and <root>/results/<job>/<sop>.dcm;
    <root>/incoming/ holds instances being received (temp files, renamed into place)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        (self.root / "results").mkdir(parents=True, exist_ok=True)
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        #: empty temp files made ahead of need (prepare_temp): (descriptor, path)
        self._spares: collections.deque[tuple[int, str]] = collections.deque()

    def prepare_temp(self, keep: int = 4) -> None:
        """Make an empty temp file for a later write_temp, unless ``keep`` are ready. Creating
        a file is the costly part of receiving one on some file systems (on this project's
        ext4 without a journal, choosing a free inode reads inode tables: 0.2 ms of CPU); the
        receiver does it after answering an instance, while the sender prepares the next. The
        file's own name is synced into incoming/ here too, which write_temp's sync would
        otherwise do first."""
        if len(self._spares) >= keep:
            return
        fd, path = self._new_temp()
        try:
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self._spares.append((fd, path))

    def _new_temp(self) -> tuple[int, str]:
        path = os.path.join(self.incoming, f"{uuid.uuid4().hex}{TEMP_SUFFIX}")
        return os.open(path, _SYNC_NEW, 0o644), path

    def close_spares(self) -> None:
        """Close and remove the temp files prepare_temp made and no write took."""
        while self._spares:
            fd, path = self._spares.popleft()
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)

    def write_temp(self, parts: Sequence[bytes | bytearray | memoryview],
                   before_write: Callable[[], object] | None = None) -> Path:
        """Write ``parts`` one after the other into a new temp file under incoming/ (one that
        prepare_temp made, if one is ready), durably; its name says nothing (the instance's UIDs
        are not known yet when this starts).

        The file is opened with O_SYNC, so each write returns once its data and the metadata
        needed to read it are on disk (Linux runs the same sync as fsync(2) at the end of each
        write call). One call does write and sync without taking the GIL in between: another
        thread can check the data set meanwhile (StorageSCP.c_store), where a separate fsync
        would first wait for the GIL that thread holds. ``before_write`` is called between
        open and write: work handed to another thread there runs during the write, where work
        handed over before the open would hold the GIL when the open returns."""
        try:  # popleft, not a length test first: several associations' threads take spares
            fd, name = self._spares.popleft()
        except IndexError:
            fd, name = self._new_temp()
        tmp = Path(name)
        try:
            if before_write is not None:
                before_write()
            _write_all(fd, parts)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def place(self, tmp: Path, rel: str) -> None:
        """Rename a fsynced temp file to ``rel`` and make the new name durable (folder fsync;
        folders created on the way are fsynced into their parents too).

        Retention (pacs_node/retention.py) may move a series folder away at any moment: the
        folder is opened before the rename and synced through that descriptor, which reaches
        the rename wherever the folder went (retention puts back what was written after its
        decision); if the path names another folder by then, that one is synced too."""
        path = os.path.join(self.root, rel)
        folder = os.path.dirname(path)
        for attempt in range(5):
            try:
                fd = os.open(folder, os.O_RDONLY)  # the series folder exists but for a series' first instance
            except FileNotFoundError:
                # a parent removed meanwhile (an empty study folder, by retention): try again
                with contextlib.suppress(FileNotFoundError):
                    self.make_folders(Path(folder))
                continue
            try:
                try:
                    os.replace(tmp, path)
                except FileNotFoundError:
                    if not os.path.exists(tmp) or attempt == 4:
                        raise
                    continue  # the folder was moved away after it was opened: make it again
                os.fsync(fd)
                try:
                    moved = os.stat(folder).st_ino != os.fstat(fd).st_ino
                except FileNotFoundError:
                    moved = False  # moved away, not made again: the rename went into fd's folder
                if moved:
                    fsync_dir(folder)
                return
            finally:
                os.close(fd)
        raise FileNotFoundError(f"cannot make folder {folder}")

    @staticmethod
    def make_folders(folder: Path) -> None:
        """Make ``folder`` and any missing parents, each synced into its parent."""
        created: list[Path] = []
        while not folder.is_dir():
            created.append(folder)
            folder = folder.parent
        for new in reversed(created):
            new.mkdir(exist_ok=True)
        for new in created:
            fsync_dir(new.parent)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        parts = (
            check_uid(study_uid, "StudyInstanceUID"),
            check_uid(series_uid, "SeriesInstanceUID"),
            check_uid(sop_uid, "SOPInstanceUID"),
        )
        return self.root / "instances" / parts[0] / parts[1] / f"{parts[2]}.dcm"

    def result_dir(self, job_id: int) -> Path:
        return self.root / "results" / str(int(job_id))

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def remove_temp_files(self) -> int:
        """Delete temp files left by a crash mid-write; they were never acknowledged."""
        count = 0
        for tmp in self.root.rglob(f"*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            count += 1
        if count:
            log.info("removed %d temporary file(s) left by an interrupted write", count)
        return count
