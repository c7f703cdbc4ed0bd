"""The DIMSE receive path: direct encodings against pydicom's, data set checks, batched index
rows, the index writer's failure handling, and files indexed again after a kill."""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from pacs_node.config import parse
from pacs_node.errors import InvalidInstance
from pacs_node.net.acceptor import Association, command_pdu, response_pdu
from pacs_node.net.scp import StorageSCP, file_header, read_dataset
from pacs_node.store.files import FileStore, write_atomic
from pacs_node.store.index import Database, Instance, Series
from pacs_node.store.indexer import index_missing_files
from pacs_node.store.ingest import Ingest

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def split(path: Path) -> tuple[Dataset, bytes]:
    """A file's meta and its data set bytes, as a C-STORE carries them."""
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        return meta, fh.read()


@pytest.mark.parametrize("sop, ae", [("1.2.3.4", "STORESCU"), ("1.2.3.45", "AE"), ("1." + "2" * 62, "X")])
def test_file_header_is_what_pydicom_writes(sop, ae):
    meta = create_file_meta(sop_class_uid=UID(CT), sop_instance_uid=UID(sop), transfer_syntax=UID(EXPLICIT))
    meta.SourceApplicationEntityTitle = ae
    assert file_header(CT, sop, EXPLICIT, ae) == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)


def _command_set(**values: object) -> Dataset:
    ds = Dataset()
    ds.CommandGroupLength = 0
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("status, comment, instance", [(0x0000, None, "1.2.3.4"), (0xC000, "PixelData has 10 bytes",
                                                                                    "1.2.3.45"), (0x0000, None, None)])
def test_response_pdu_is_what_pydicom_encodes(status, comment, instance):
    rsp = _command_set(AffectedSOPClassUID=CT, CommandField=0x8001, MessageIDBeingRespondedTo=7,
                       CommandDataSetType=0x0101, Status=status)
    if comment:
        rsp.ErrorComment = comment
    if instance:
        rsp.AffectedSOPInstanceUID = instance
    assert response_pdu(3, 0x8001, 7, status, CT, instance, comment) == command_pdu(3, rsp)


def test_command_reader_agrees_with_pydicom_and_refuses_garbage():
    from pynetdicom.dsutils import decode

    from pacs_node.net.acceptor import Abort, Acceptor, Command

    rq = _command_set(AffectedSOPClassUID=CT, CommandField=0x0001, MessageID=513, Priority=0, CommandDataSetType=0,
                      AffectedSOPInstanceUID="1.2.3.45", MoveOriginatorApplicationEntityTitle="MOVER")
    raw = command_pdu(1, rq)[12:]  # PDU header (6) and PDV item header (6) off
    ours, theirs = Command(raw), decode(BytesIO(raw), True, True)
    for keyword in ("AffectedSOPClassUID", "CommandField", "MessageID", "Priority", "CommandDataSetType",
                    "AffectedSOPInstanceUID", "MoveOriginatorApplicationEntityTitle"):
        assert ours.get(keyword) == theirs.get(keyword), keyword
    assert ours.get("MoveDestination", "none") == "none"
    for bad, why in [(raw[:-3], "longer than the command set"), (raw + b"\x08\x00", "truncated element header"),
                     (raw + b"\x08\x00\x18\x00\x00\x00\x00\x00", "outside the command group")]:
        with pytest.raises(ValueError, match=why):
            Command(bad)
    # a Command Field of the wrong length, or none at all: the acceptor aborts the association
    wrong_length = bytes(raw).replace(b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x00", b"\x00\x00\x00\x01\x04\x00\x00\x00\x01\x00\x00\x00")
    for bad in (wrong_length, b""):
        with pytest.raises(Abort, match="unreadable command set"):
            Acceptor._decode_command(bytearray(bad))


def test_data_set_checks_refuse_truncation_and_leave_pixels_in_the_buffer(ge_head, data):
    meta, body = split(sorted(ge_head.glob("*.dcm"))[0])
    ds = read_dataset(bytearray(body), str(meta.TransferSyntaxUID))
    assert ds.SOPInstanceUID == meta.MediaStorageSOPInstanceUID
    assert ds.get_item("PixelData", keep_deferred=True).value is None  # not copied out
    with pytest.raises(InvalidInstance, match="PixelData|claims"):
        read_dataset(bytearray(body[:-100]), str(meta.TransferSyntaxUID))
    # encapsulated pixel data cut short: pydicom itself only warns and drops the element
    meta, body = split(data / "compressed" / "transfer-syntaxes" / "wg04" / "CT1_JLSN.dcm")
    assert read_dataset(body, str(meta.TransferSyntaxUID)).SOPInstanceUID
    with pytest.raises(InvalidInstance, match="ends inside an element"):
        read_dataset(body[:-100], str(meta.TransferSyntaxUID))
    # a sequence item whose content is garbage is refused (sequences are read item by item)
    meta, body = split(sorted(ge_head.glob("*.dcm"))[0])
    garbage = struct.pack("<HHL", 0xFFFE, 0xE000, 8) + b"\x08\x00\x18\x00UI\xff\x7f"
    sq = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<L", len(garbage)) + garbage
    at = body.find(struct.pack("<HH", 0x7FE0, 0x0010))
    with pytest.raises(InvalidInstance, match=r"\(0008,0018\) claims 32767 bytes"):
        read_dataset(body[:at] + sq + body[at:], str(meta.TransferSyntaxUID))


def entries_of(ingest: Ingest, files: list[Path]):  # type: ignore[no-untyped-def]
    return [ingest.entry(pydicom.dcmread(p, stop_before_pixels=True), p.stat().st_size, "SCU", EXPLICIT)
            for p in files]


def test_one_batch_indexes_many_instances_moves_and_repeats(tmp_path, ge_head):
    ingest = Ingest(Database(f"sqlite:///{tmp_path / 'x.db'}"), FileStore(tmp_path / "s"))
    entries = entries_of(ingest, sorted(ge_head.glob("*.dcm"))[:5])
    series = entries[0].series_uid
    moved = dataclasses.replace(entries[1], series_uid="1.2.3.999", rel=entries[1].rel.replace(series, "1.2.3.999"))
    # the same SOP Instance UID twice in one batch, the second under another series: it ends there
    previous = ingest.index([*entries, moved])
    assert previous == [None, None, None, None, None, entries[1].rel]

    def counts(s):  # type: ignore[no-untyped-def]
        return dict(s.execute(select(Series.series_uid, Series.instance_count)).all())

    assert ingest.db.run(counts) == {series: 4, "1.2.3.999": 1}
    assert ingest.db.run(lambda s: s.execute(select(Instance.path).where(
        Instance.sop_uid == moved.sop_uid)).scalar_one()) == moved.rel
    # again, in a later batch: nothing new, counts unchanged, previous paths reported
    assert ingest.index(entries[:2]) == [entries[0].rel, moved.rel]
    assert ingest.db.run(counts) == {series: 5, "1.2.3.999": 0}


def test_scp_refuses_while_the_index_fails_and_loses_nothing(tmp_path, ge_head, monkeypatch):
    settings = parse({"node": {"storage_dir": str(tmp_path / "s"), "database_url": f"sqlite:///{tmp_path}/n.db",
                               "allow_any_caller": True}}, tmp_path)
    db = Database(settings.node.database_url)
    ingest = Ingest(db, FileStore(settings.node.storage_dir))
    scp = StorageSCP(settings, db, ingest, lambda key, series: None, lambda key: None)
    scp.indexer.linger = 0.0
    real_index, failures = ingest.index, [10**9]  # failing until the test has seen the refusal

    def flaky(entries):  # type: ignore[no-untyped-def]
        if failures[0] > 0:
            failures[0] -= 1
            raise OperationalError("INSERT", {}, Exception("disk I/O error"))
        return real_index(entries)

    monkeypatch.setattr(ingest, "index", flaky)
    scp.start()
    try:
        assoc = Association("SCU", "127.0.0.1", 1)
        assoc.contexts[1] = (CT, EXPLICIT)
        scp.accepted(assoc)
        files = sorted(ge_head.glob("*.dcm"))[:3]

        def store(path: Path) -> int:
            meta, body = split(path)
            command = Dataset()
            command.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
            command.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
            return int(scp.c_store(assoc, 1, command, bytearray(body)).Status)

        assert store(files[0]) == 0x0000  # acknowledged: its file is durable
        deadline = time.monotonic() + 10
        while scp.indexer.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scp.indexer.error is not None
        refused = store(files[1])
        assert refused == 0xA700  # out of resources while the index cannot be written
        failures[0] = 1  # the database recovers after one more failed try
        assert scp.indexer.flush(timeout=30)  # the writer's retries got through
        assert scp.indexer.error is None
        assert store(files[2]) == 0x0000
        assert scp.indexer.flush(timeout=30)
        stored = {files[0].name, files[2].name}
        rows = db.run(lambda s: s.execute(select(Instance.sop_uid)).scalars().all())
        assert sorted(rows) == sorted(pydicom.dcmread(files[i], stop_before_pixels=True).SOPInstanceUID
                                      for i in (0, 2))
        assert len(list((tmp_path / "s" / "instances").rglob("*.dcm"))) == len(stored)
        # the refused instance's temp file is gone; what is left are empty ones made ahead
        assert all(p.stat().st_size == 0 for p in (tmp_path / "s" / "incoming").iterdir())
    finally:
        scp.stop()
    assert not list((tmp_path / "s" / "incoming").iterdir())


def test_files_that_were_not_indexed_at_a_kill_are_indexed_at_start(tmp_path, ge_head):
    ingest = Ingest(Database(f"sqlite:///{tmp_path / 'x.db'}"), FileStore(tmp_path / "s"))
    files = sorted(ge_head.glob("*.dcm"))[:4]
    entries = entries_of(ingest, files)
    ingest.index(entries[:1])
    for entry, path in zip(entries, files):  # all four on disk, one indexed
        write_atomic(ingest.files.absolute(entry.rel), path.read_bytes())
    # an instance that moved to another series after its old file was written: the old file
    # (whose removal a kill interrupted) must go, not come back into the index
    moved = dataclasses.replace(entries[3], series_uid="1.2.3.77",
                                rel=entries[3].rel.replace(entries[3].series_uid, "1.2.3.77"))
    write_atomic(ingest.files.absolute(moved.rel), files[3].read_bytes())
    old = ingest.files.absolute(entries[3].rel)
    os.utime(old, (time.time() - 60, time.time() - 60))
    ingest.index([moved])
    assert index_missing_files(ingest) == 2
    assert not old.exists()
    assert ingest.db.run(lambda s: s.execute(select(Series.instance_count).where(
        Series.series_uid == entries[0].series_uid)).scalar_one()) == 3
    assert index_missing_files(ingest) == 0


def test_index_writer_stops_while_the_database_still_fails(tmp_path, ge_head, monkeypatch):
    from pacs_node.store.indexer import IndexWriter

    ingest = Ingest(Database(f"sqlite:///{tmp_path / 'x.db'}"), FileStore(tmp_path / "s"))

    def down(entries):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT", {}, Exception("unable to open database file"))

    monkeypatch.setattr(ingest, "index", down)
    writer = IndexWriter(ingest, linger=0.0)
    writer.start()
    writer.submit(entries_of(ingest, sorted(ge_head.glob("*.dcm"))[:1])[0])
    t0 = time.monotonic()
    writer.stop(timeout=0.5)  # the entry stays unindexed (its file is indexed at the next start)
    assert time.monotonic() - t0 < 10
    assert writer.pending == 1 and writer.error is not None


def test_deflated_data_sets_are_read_and_a_deflate_bomb_refused(ge_head, monkeypatch):
    import zlib

    from pacs_node.net import scp as scp_module

    meta, body = split(sorted(ge_head.glob("*.dcm"))[0])
    assert str(meta.TransferSyntaxUID) == EXPLICIT

    def deflate(raw: bytes) -> bytes:
        squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return squeeze.compress(raw) + squeeze.flush()

    deflated = "1.2.840.10008.1.2.1.99"
    assert read_dataset(deflate(body), deflated).SOPInstanceUID == meta.MediaStorageSOPInstanceUID
    monkeypatch.setattr(scp_module, "_MAX_INFLATED", 1 << 20)
    with pytest.raises(InvalidInstance, match="inflates to more than 1 MiB"):
        read_dataset(deflate(b"\0" * (2 << 20)), deflated)
