"""Fuzz a real `pacs-node serve`: malformed datasets over C-STORE and malformed PDUs over raw TCP.

    .venv/bin/python bench/fuzz_store.py --datasets 10000 --pdus 2000   # the full run (docs/reliability.md)

Datasets (hypothesis): a valid small CT instance, then truncated, bytes overwritten, element
lengths corrupted (odd, huge, 0xFFFFFFFF), VRs replaced, Rows/Columns/BitsAllocated/frames made
absurd (pixel data shorter than they say), UIDs replaced by paths and junk ("../../etc",
"1.2/3", 70 digits), encodings swapped (implicit sent as explicit, big endian), unknown private
elements claiming gigabytes, nested sequences hundreds deep, or plain random bytes. Each is sent
in a real association. Property: every request gets a status or the association is aborted
(never a hang); a success means the file is stored, under the storage folder, with exactly the
bytes sent; nothing is ever written outside storage/instances/<uid>/<uid>/<uid>.dcm.

PDUs (hypothesis): a valid A-ASSOCIATE-RQ, alone or followed by a P-DATA-TF carrying a C-ECHO,
mutated (bytes, lengths, types, truncation) or replaced by random bytes, written to a raw
socket. Property: the node answers (A-ASSOCIATE-AC/RJ, P-DATA, A-ABORT) or closes the
connection within the timeout, and still answers a C-ECHO afterwards.

Throughout: the node process stays alive and its resident memory stays bounded (the peak is
printed). A PDU whose header claims more than pacs_node.net.scp.MAX_PDU_BYTES closes the
connection at once instead of making the node wait for (and buffer) gigabytes.
"""

from __future__ import annotations

import argparse
import io
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crash_soak import Node, synthetic_ct_series  # noqa: E402

CALLING = "SOAKSCU"
VERIFICATION = "1.2.840.10008.1.1"


# -- datasets -------------------------------------------------------------------------------
def encode(ds: Dataset, syntax: str) -> bytes:
    """The dataset alone (no file meta) in ``syntax``."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    fp.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(fp, ds)
    return fp.getvalue()


def file_with(meta_sop: str, syntax: str, body: bytes, path: Path) -> Path:
    """A file: valid file meta (so the client can send it) + ``body`` as the dataset bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = meta_sop
    meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    from pydicom.filewriter import write_file_meta_info

    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(body)
    path.write_bytes(buf.getvalue())
    return path


def overwrite_spans(draw, data: bytes, max_spans: int, max_chunk: int) -> bytes:  # type: ignore[no-untyped-def]
    """``data`` with 1..max_spans random spans overwritten by 1..max_chunk random bytes each."""
    for _ in range(draw(st.integers(1, max_spans))):
        at = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=max_chunk))
        data = data[:at] + chunk + data[at + len(chunk):]
    return data


@st.composite
def malformed_instance(draw, base: Path) -> tuple[str, str, bytes, str]:  # type: ignore[no-untyped-def]
    """(kind, transfer syntax, dataset bytes, SOP UID for the request) of one malformed C-STORE, from the file ``base``."""
    ds = pydicom.dcmread(base)  # a fresh copy each time (Dataset(ds) would share its elements)
    del ds.file_meta
    # drawn, not random: the same draws must give the same bytes (hypothesis replays them)
    sop = f"1.2.826.0.1.3680043.10.511.{draw(st.integers(1, 10**15))}"
    ds.SOPInstanceUID = sop
    kind = draw(st.sampled_from(["valid", "truncate", "overwrite", "length", "vr", "pixels", "uid", "syntax",
                                 "huge-element", "deep-sequence", "random"]))
    syntax = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    if kind == "pixels":
        for keyword in draw(st.lists(st.sampled_from(["Rows", "Columns", "BitsAllocated", "NumberOfFrames",
                                                      "SamplesPerPixel"]), min_size=1, max_size=3, unique=True)):
            value = draw(st.sampled_from([0, 1, 3, 17, 4096, 65535]))
            if keyword == "NumberOfFrames":
                ds.NumberOfFrames = draw(st.sampled_from(["0", "-1", "99999999", "1000000000"]))
            else:
                setattr(ds, keyword, value)
        if draw(st.booleans()):
            ds.PixelData = bytes(ds.PixelData)[: draw(st.integers(0, len(ds.PixelData)))]
    if kind == "uid":
        keyword = draw(st.sampled_from(["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"]))
        value = draw(st.one_of(st.sampled_from(["../../etc/passwd", "..", "/tmp/x", "1.2/3", "1.2\\3", "1." + "9" * 70,
                                                "", " ", "1..2", "1.2.a", "1.2\x00.3"]),
                               st.text(st.characters(max_codepoint=255), max_size=80)))
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            sop = value if (value and len(value) <= 64 and all(c in "0123456789." for c in value)) else sop
    body = encode(ds, syntax)
    if kind == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif kind == "overwrite":
        body = overwrite_spans(draw, body, 8, 8)
    elif kind == "length":
        # an element's length field: explicit VR short form at +6 (2 bytes), implicit at +4 (4 bytes)
        tag = draw(st.sampled_from([(0x0008, 0x0018), (0x0020, 0x000D), (0x0028, 0x0010), (0x7FE0, 0x0010),
                                    (0x0010, 0x0010), (0x0008, 0x0060)]))
        at = body.find(struct.pack("<HH", *tag))
        if at >= 0:
            if syntax == ImplicitVRLittleEndian or tag == (0x7FE0, 0x0010):
                off = at + 4 if syntax == ImplicitVRLittleEndian else at + 8
                value = draw(st.sampled_from([0, 1, 3, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFF0]))
                body = body[:off] + struct.pack("<L", value) + body[off + 4:]
            else:
                value = draw(st.sampled_from([0, 1, 3, 0x7FFF, 0xFFFF]))
                body = body[:at + 6] + struct.pack("<H", value) + body[at + 8:]
    elif kind == "vr" and syntax == ExplicitVRLittleEndian:
        tag = draw(st.sampled_from([(0x0008, 0x0018), (0x0020, 0x000E), (0x0028, 0x0010), (0x0028, 0x0030),
                                    (0x0010, 0x0010), (0x0020, 0x0032), (0x7FE0, 0x0010)]))
        at = body.find(struct.pack("<HH", *tag))
        if at >= 0:
            vr = draw(st.one_of(st.sampled_from([b"SQ", b"OB", b"UN", b"US", b"FD", b"UT", b"AT", b"xx", b"\0\0"]),
                                st.binary(min_size=2, max_size=2)))
            body = body[:at + 4] + vr + body[at + 6:]
    elif kind == "syntax":
        # bytes in one encoding, announced in another
        other = draw(st.sampled_from([ExplicitVRBigEndian, ImplicitVRLittleEndian, ExplicitVRLittleEndian]))
        body = encode(ds, other)
    elif kind == "huge-element":
        group = draw(st.sampled_from([0x0009, 0x7FE1, 0xFFFE, 0x0002]))
        length = draw(st.sampled_from([0xFFFFFFF0, 0x7FFFFFFF, 0x10000000]))
        if syntax == ImplicitVRLittleEndian:
            body += struct.pack("<HHL", group, 0x1010, length) + b"\x01" * draw(st.integers(0, 64))
        else:
            body += struct.pack("<HH", group, 0x1010) + b"OB\0\0" + struct.pack("<L", length) + b"\x01" * 16
    elif kind == "deep-sequence":
        # sequences of undefined length nested hundreds deep, written by hand (pydicom's own
        # writer recurses too), inserted before the pixel data
        depth = draw(st.integers(50, 5000))
        implicit = syntax == ImplicitVRLittleEndian
        sq = struct.pack("<HH", 0x0040, 0xA730) + (b"" if implicit else b"SQ\0\0") + struct.pack("<L", 0xFFFFFFFF)
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        at = body.find(struct.pack("<HH", 0x7FE0, 0x0010))
        body = body[:at] + (sq + item) * depth + end * depth + body[at:]
    elif kind == "random":
        body = draw(st.binary(max_size=4096))
    if body[:2] in (b"\x02\x00", b"\x00\x02"):
        # pynetdicom's client reads group 0002 at the start of a file's dataset as file meta,
        # values included (a random length there makes the *client* allocate gigabytes)
        body = b"\x08\x00" + body[2:]
    return kind, syntax, body, sop


@dataclass
class FuzzStats:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    #: (kind, outcome) counts: which malformations the node accepted and which it refused
    kind_outcomes: Counter = field(default_factory=Counter)
    rss_first_kib: int = 0
    rss_peak_kib: int = 0
    rss_last_kib: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note_memory(self, node: Node) -> None:
        rss, peak = node.memory_kib()
        self.rss_first_kib = self.rss_first_kib or rss
        self.rss_last_kib = rss
        self.rss_peak_kib = max(self.rss_peak_kib, peak)

    def lines(self, what: str) -> list[str]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items()))
        per_kind = "; ".join(f"{k}: " + " ".join(f"{o}={n}" for (kk, o), n in sorted(self.kind_outcomes.items()) if kk == k)
                             for k in sorted(self.by_kind))
        return [f"{what} fuzzed:  {self.cases} cases ({kinds})",
                f"  outcomes:  {outcomes}",
                f"  per kind:  {per_kind}",
                f"  node RSS:  {self.rss_first_kib / 1024:.0f} MiB at start, {self.rss_last_kib / 1024:.0f} MiB at end, "
                f"peak {self.rss_peak_kib / 1024:.0f} MiB",
                *[f"  note:      {n}" for n in self.notes],
                f"  problems:  {len(self.problems)}", *[f"    - {p}" for p in self.problems[:20]]]


class StoreClient:
    """One association to the node, reopened when the node aborts it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.assoc = None
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's dataset bytes as they are
        # pynetdicom finds where the data set starts by reading elements until one is not in
        # group 0002, which raises struct.error on a body of 8-11 bytes whose first "VR" reads
        # as OB, SQ, UN...: the harness's files always have a group length, so use it
        import pynetdicom.association

        pynetdicom.association.split_dataset = split_by_group_length

    def _open(self):  # type: ignore[no-untyped-def]
        if self.assoc is None or not self.assoc.is_established:
            ae = AE(ae_title=CALLING)
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                ae.add_requested_context(CTImageStorage, syntax)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            self.assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSNODE")
            if not self.assoc.is_established:
                raise AssertionError("the node refused a new association")
        return self.assoc

    def store(self, path: Path) -> str:
        """'0x0000'-style status, or 'abort' when the association ended without an answer."""
        assoc = self._open()
        status = assoc.send_c_store(path)
        if status and "Status" in status:
            return f"0x{int(status.Status):04X}"
        if assoc.is_established:
            raise AssertionError("no answer within the DIMSE timeout and the association still open: a hang")
        return "abort"

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def split_by_group_length(path: Path):  # type: ignore[no-untyped-def]
    """(file meta, offset of the data set) from the file's (0002,0000) group length, whatever
    the data set bytes are (a stand-in for pynetdicom's ``split_dataset``)."""
    from pydicom.filereader import _read_file_meta_info

    with open(path, "rb") as fh:
        fh.seek(128 + 4)
        head = fh.read(12)
        if head[:4] != b"\x02\x00\x00\x00" or head[4:6] != b"UL":
            raise ValueError(f"{path}: no file meta group length")
        end = 128 + 4 + 12 + struct.unpack("<I", head[8:12])[0]
        fh.seek(128 + 4)
        meta = _read_file_meta_info(io.BytesIO(fh.read(end - 128 - 4)))  # the meta alone
        return meta, end


def allowed_file(rel: Path) -> bool:
    parts = rel.parts
    if len(parts) == 1 and (parts[0].startswith("node.") or parts[0] == "node.toml"):
        return True
    if parts[:1] != ("storage",):
        return False
    if len(parts) == 3 and parts[1] == "run" and parts[2].endswith(".json"):
        return True  # the running node's pid and ports (Node._write_run_file), for `pacs-node check`
    if len(parts) == 5 and parts[1] == "instances":
        return all(c in "0123456789." for c in "".join(parts[2:4]) + parts[4].removesuffix(".dcm")) and \
            parts[4].endswith(".dcm")
    return False


def empty_spare(path: Path) -> bool:
    """An empty temp file the node made ahead of the next instance (FileStore.prepare_temp)."""
    return path.parent.name == "incoming" and path.name.endswith(".partial") and path.stat().st_size == 0


def stored_body(path: Path) -> bytes | None:
    """The data set bytes of a stored file (after its file meta), None if it is gone."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        with open(path, "rb") as fh:
            read_preamble(fh, False)
            _read_file_meta_info(fh)
            return fh.read()
    except FileNotFoundError:
        return None


def fuzz_datasets(node: Node, cases: int, workdir: Path, seed: int | None = None) -> FuzzStats:
    base = synthetic_ct_series(workdir / "base", 1, 16, patient_name="FUZZ^BASE")[0]
    stats = FuzzStats()
    client = StoreClient(node.port)
    path = workdir / "case.dcm"
    storage = node.root / "storage"

    @settings(max_examples=cases, deadline=None, database=None, derandomize=seed is not None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=malformed_instance(base))
    def one(case) -> None:  # type: ignore[no-untyped-def]
        kind, syntax, body, sop = case
        meta_sop = sop if sop and len(sop) <= 64 and all(c in "0123456789." for c in sop) else "1.2.3.4"
        file_with(meta_sop, syntax, body, path)
        outcome = client.store(path)
        stats.cases += 1
        stats.by_kind[kind] += 1
        stats.outcomes[outcome] += 1
        stats.kind_outcomes[kind, outcome] += 1
        if outcome == "0x0000":
            # the file is durable before the acknowledgement; its index row follows within the
            # index writer's linger (store/indexer.py): until then a re-sent SOP Instance UID's
            # row may still name the file of the earlier case
            end = time.monotonic() + 30  # a loaded machine's SQLite commit can take seconds
            while True:
                rows = node.query("select path from instance where sop_uid = ?", (meta_sop,))
                stored = stored_body(storage / rows[0][0]) if len(rows) == 1 else None
                if stored == body or time.monotonic() > end:
                    break
                time.sleep(0.01)
            assert len(rows) == 1, f"{kind}: success but {len(rows)} index row(s) for {meta_sop}"
            assert stored == body, f"{kind}: stored bytes differ from the bytes acknowledged"
        if stats.cases % 200 == 0:
            stats.note_memory(node)
            assert node.proc.poll() is None, "the node died"

    try:
        stats.note_memory(node)
        one()
    except Exception as exc:  # noqa: BLE001 - reported with the figures
        inner = [f"{type(e).__name__}: {str(e)[:300]}" for e in getattr(exc, "exceptions", ())]
        stats.problems.append(f"{type(exc).__name__}: {str(exc)[:500]}" + (f" [{'; '.join(inner)}]" if inner else ""))
    finally:
        client.close()
    if node.proc.poll() is not None:
        stats.problems.append(f"node exited with {node.proc.returncode}")
    else:
        stats.note_memory(node)
    indexed = {row[0] for row in node.query("select path from instance")}
    on_disk = {str(p.relative_to(storage)) for p in (storage / "instances").rglob("*.dcm")}
    stats.notes.append(f"{len(indexed)} instance(s) indexed, {len(on_disk - indexed)} file(s) on disk not in the "
                       "index (an SOP Instance UID re-sent under another Study/Series UID leaves its old file)")
    outside = [p.relative_to(node.root) for p in node.root.rglob("*") if p.is_file()]
    bad = [str(p) for p in outside if not allowed_file(p) and not empty_spare(node.root / p)]
    if bad:
        stats.problems.append(f"files outside storage/instances/<uid>/<uid>/<uid>.dcm (and the node's run file): "
                              f"{bad[:5]}")
    return stats


# -- PDUs -----------------------------------------------------------------------------------
def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called: str = "PACSNODE", calling: str = CALLING) -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification with Implicit VR Little Endian."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\0" * 32
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    ctx = struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, VERIFICATION.encode()) + _item(0x40, b"1.2.840.10008.1.2")
    body += _item(0x20, ctx)
    body += _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3.4"))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def echo_pdata() -> bytes:
    """A P-DATA-TF with a complete C-ECHO-RQ command set (Implicit VR Little Endian)."""
    def el(group: int, elem: int, value: bytes) -> bytes:
        return struct.pack("<HHL", group, elem, len(value)) + value
    uid = VERIFICATION.encode() + b"\0"
    cmd = el(0, 0x0002, uid) + el(0, 0x0100, struct.pack("<H", 0x0030)) + el(0, 0x0110, struct.pack("<H", 1)) + \
        el(0, 0x0800, struct.pack("<H", 0x0101))
    cmd = el(0, 0x0000, struct.pack("<L", len(cmd))) + cmd
    pdv = struct.pack(">LBB", len(cmd) + 2, 1, 0x03) + cmd
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


@st.composite
def malformed_pdus(draw) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["valid", "overwrite", "length", "type", "truncate", "random", "pdata", "huge"]))
    rq = associate_rq()
    data = rq + (echo_pdata() if draw(st.booleans()) else b"")
    if kind == "overwrite":
        data = overwrite_spans(draw, data, 6, 4)
    elif kind == "length":
        at = draw(st.sampled_from([2, 74, 76, 78, len(rq) + 2, len(rq) + 6]))
        data = data[:at] + draw(st.binary(min_size=2, max_size=4)) + data[at + 4:]
    elif kind == "type":
        data = bytes([draw(st.integers(0, 255))]) + data[1:]
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "random":
        data = draw(st.binary(max_size=2048))
    elif kind == "pdata":
        pdu = echo_pdata()
        at = draw(st.integers(6, len(pdu) - 1))
        data = rq + pdu[:at] + draw(st.binary(min_size=1, max_size=16)) + pdu[at + 1:]
    elif kind == "huge":
        # a header that claims gigabytes, then a little data and silence
        data = struct.pack(">BBL", draw(st.sampled_from([1, 4, 5, 7])), 0, draw(st.sampled_from(
            [0xFFFFFFFF, 0x7FFFFFFF, 0x10000000]))) + draw(st.binary(max_size=64))
    return kind, data


def send_raw(port: int, data: bytes, timeout: float) -> str:
    """Write ``data``, half-close, and read until the node closes: 'closed:<first PDU type>' or 'timeout'."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return "closed:reset"
        first = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                first = first or chunk[:1]
            else:
                return "timeout"
        except socket.timeout:
            return "timeout"
        except OSError:
            return "closed:reset"
    names = {1: "rq", 2: "ac", 3: "rj", 4: "pdata", 5: "release-rq", 6: "release-rp", 7: "abort"}
    return f"closed:{names.get(first[0], 'other') if first else 'nothing'}"


def echo_ok(port: int) -> bool:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def fuzz_pdus(node: Node, cases: int, timeout: float = 45.0, seed: int | None = None) -> FuzzStats:
    """Half-closed sockets: the node sees end-of-stream after the bytes, so the answer is prompt;
    a silent peer that keeps the socket open is covered by the network timeout (60 s) instead."""
    stats = FuzzStats()

    @settings(max_examples=cases, deadline=None, database=None, derandomize=seed is not None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=malformed_pdus())
    def one(case) -> None:  # type: ignore[no-untyped-def]
        kind, data = case
        outcome = send_raw(node.port, data, timeout)
        stats.cases += 1
        stats.by_kind[kind] += 1
        stats.outcomes[outcome] += 1
        stats.kind_outcomes[kind, outcome] += 1
        assert outcome != "timeout", f"{kind}: no answer and no close within {timeout} s"
        if stats.cases % 100 == 0:
            stats.note_memory(node)
            assert echo_ok(node.port), "the node stopped answering C-ECHO"

    try:
        stats.note_memory(node)
        one()
        # a header claiming 4 GB followed by a stream of data is cut at the PDU bound
        with socket.create_connection(("127.0.0.1", node.port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">BBL", 4, 0, 0xFFFFFFF0))
            sent = 0
            try:
                while sent < 64 * 1024 * 1024:
                    sock.sendall(b"\0" * 65536)
                    sent += 65536
                stats.problems.append("64 MiB of one PDU accepted: the PDU bound did not close the connection")
            except OSError:
                stats.outcomes[f"4 GB PDU: closed after {sent // 1024} KiB"] += 1
        assert echo_ok(node.port), "the node stopped answering C-ECHO"
    except Exception as exc:  # noqa: BLE001
        stats.problems.append(f"{type(exc).__name__}: {str(exc)[:500]}")
    if node.proc.poll() is not None:
        stats.problems.append(f"node exited with {node.proc.returncode}")
    else:
        stats.note_memory(node)
    return stats


def run_fuzz(workdir: Path, datasets: int, pdus: int, seed: int | None = None) -> tuple[FuzzStats, FuzzStats]:
    node = Node(workdir / "node", None, rules=False)
    node.start()
    try:
        ds_stats = fuzz_datasets(node, datasets, workdir, seed)
        pdu_stats = fuzz_pdus(node, pdus, seed=seed)
    finally:
        node.stop()
    return ds_stats, pdu_stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=10000)
    parser.add_argument("--pdus", type=int, default=2000)
    args = parser.parse_args()
    import resource

    # this process only: a runaway allocation in the fuzzing client fails here, not the machine
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    with tempfile.TemporaryDirectory(prefix="pacs-node-fuzz-") as tmp:
        t0 = time.monotonic()
        ds_stats, pdu_stats = run_fuzz(Path(tmp), args.datasets, args.pdus)
        print("\n".join(ds_stats.lines("C-STORE datasets") + pdu_stats.lines("PDUs")))
        print(f"wall time: {time.monotonic() - t0:.0f} s")
    return 1 if ds_stats.problems or pdu_stats.problems else 0


if __name__ == "__main__":
    sys.exit(main())
