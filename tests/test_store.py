"""Storage: UIDs cannot steer paths, writes are atomic, the schema matches the migrations."""

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
