"""The C-STORE sender against a pynetdicom SCP: PDU sizes, syntax conversion, refusals, loss."""

from __future__ import annotations

import threading

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from conftest import free_port
from pacs_node.net.scu import SendError, send_files


class Destination:
    """A pynetdicom storage SCP that records what it received (or answers a fixed status)."""

    def __init__(self, syntaxes: list[str], max_pdu: int, status: int = 0x0000, abort_after: int | None = None):
        self.received: list[tuple[str, str, bytes]] = []
        self.status = status
        self.abort_after = abort_after
        self.lock = threading.Lock()
        ae = AE(ae_title="DEST")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(CTImageStorage, syntaxes)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])

    def on_store(self, event):  # type: ignore[no-untyped-def]
        with self.lock:
            if self.abort_after is not None and len(self.received) >= self.abort_after:
                event.assoc.abort()
                return 0xC000
            ds = event.dataset
            self.received.append((str(event.context.transfer_syntax), str(ds.SOPInstanceUID), ds.PixelData))
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("syntaxes, max_pdu, converted", [
    ([ExplicitVRLittleEndian], 16384, False),  # many P-DATA-TF PDUs per instance
    ([ExplicitVRLittleEndian], 0, False),  # no limit: one PDU per instance
    ([ImplicitVRLittleEndian], 16384, True),  # the file's syntax refused: pynetdicom converts
])
def test_files_arrive_whole_in_the_accepted_syntax(ge_head, syntaxes, max_pdu, converted):
    files = sorted(ge_head.glob("*.dcm"))[:3]
    assert all(str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ExplicitVRLittleEndian
               for f in files)
    dest = Destination(syntaxes, max_pdu)
    try:
        report = send_files(files, "PACSNODE", "DEST", "127.0.0.1", dest.port, timeout=15)
    finally:
        dest.stop()
    assert report.ok == files and report.rejected == []
    assert [r[0] for r in dest.received] == [syntaxes[0]] * 3
    for path, (_, sop, pixels) in zip(files, dest.received):
        source = pydicom.dcmread(path)
        assert sop == source.SOPInstanceUID and pixels == source.PixelData


def test_refusals_are_reported_and_a_lost_association_raises(ge_head):
    files = sorted(ge_head.glob("*.dcm"))[:3]
    dest = Destination([ExplicitVRLittleEndian], 16384, status=0xA700)
    try:
        report = send_files(files, "PACSNODE", "DEST", "127.0.0.1", dest.port, timeout=15)
    finally:
        dest.stop()
    assert report.ok == [] and [status for _, status in report.rejected] == ["0xA700"] * 3
    dest = Destination([ExplicitVRLittleEndian], 16384, abort_after=1)
    try:
        with pytest.raises(SendError, match="aborted|lost"):
            send_files(files, "PACSNODE", "DEST", "127.0.0.1", dest.port, timeout=15)
    finally:
        dest.stop()
    with pytest.raises(SendError, match="no connection"):
        send_files(files, "PACSNODE", "DEST", "127.0.0.1", free_port(), timeout=5)
