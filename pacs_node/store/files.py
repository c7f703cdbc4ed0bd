"""Instance and result files: atomic writes (temp + fsync + rename) under paths built from checked UIDs."""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

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


def fsync_dir(path: Path) -> None:
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


class FileStore:
    """Layout: <root>/instances/<study>/<series>/<sop>.dcm and <root>/results/<job>/<sop>.dcm."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        (self.root / "results").mkdir(parents=True, exist_ok=True)

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
