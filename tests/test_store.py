"""Storage: UIDs cannot steer paths, writes are atomic, the schema matches the migrations."""

import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pacs_node.errors import InvalidInstance
from pacs_node.store.files import FileStore, check_uid, write_atomic
from pacs_node.store.index import Base, Database


@pytest.mark.parametrize("uid", ["", "../../etc/passwd", "1.2/3", "1.2\x00.3", "1." + "2" * 70, "1.2.a", ".."])
def test_bad_uids_rejected(uid):
    with pytest.raises(InvalidInstance):
        check_uid(uid, "SOPInstanceUID")


def test_paths_stay_under_root(tmp_path):
    store = FileStore(tmp_path)
    path = store.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path.resolve().is_relative_to(tmp_path.resolve())
    with pytest.raises(InvalidInstance):
        store.instance_path("1.2.3", "..", "1.2")


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    target = tmp_path / "a" / "x.dcm"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]
    (target.parent / ".x.dcm.123.partial").write_bytes(b"half")
    assert FileStore(tmp_path).remove_temp_files() == 1


def test_migrations_create_exactly_the_models(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_temp_files_made_ahead_are_used_once_and_removed(tmp_path):
    """prepare_temp makes empty temp files ahead of need; write_temp takes them in turn (each
    once), makes a new one when none is ready, and close_spares / the start-up sweep remove
    the unused ones."""
    files = FileStore(tmp_path / "storage")
    for _ in range(6):
        files.prepare_temp(keep=3)
    ready = sorted(p.name for p in files.incoming.iterdir())
    assert len(ready) == 3 and all(os.path.getsize(files.incoming / n) == 0 for n in ready)
    written = [files.write_temp((b"head", bytearray(b"body%d" % i))) for i in range(4)]
    assert sorted(p.name for p in written[:3]) == ready  # the spares, each once
    assert written[3].name not in ready and len(set(written)) == 4
    assert [p.read_bytes() for p in written] == [b"headbody%d" % i for i in range(4)]
    files.prepare_temp()
    files.prepare_temp()
    files.close_spares()
    assert sorted(files.incoming.iterdir()) == sorted(written)
    files.prepare_temp()  # left behind by a crash: the start-up sweep takes it
    assert FileStore(tmp_path / "storage").remove_temp_files() == 5
    files.close_spares()
