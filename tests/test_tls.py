"""Scenario: DICOM TLS with mutual authentication, on both sides of the node.

Certificates are made in the test with `openssl`: one CA that signs the node's, a good
client's and the storescp's certificates, and a second, unknown CA that signs a rogue
client's certificate. The node listens TLS-only with require_client_certificate = true:
a caller with a good certificate is served (pynetdicom and DCMTK echoscu), a caller without
a certificate, with the rogue one, or speaking plain TCP is refused in the handshake, and
the node keeps serving. Sending results goes to a TLS-enabled DCMTK storescp that requires
our certificate.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from conftest import associate_noting_rejection, free_port, port_open, tool, wait_for
from pacs_node.config import ConfigError, Peer, TlsSettings, parse
from pacs_node.net.scu import SendError, send_files
from pacs_node.net.tls import client_context, context_for_peer

PEERS = [{"name": "modality", "ae_title": "TLSSCU"}, {"name": "echo", "ae_title": "ECHOSCU"}]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(root: Path) -> Path:
    """ca.pem/rogue-ca.pem and, per name, NAME.key/NAME.pem (server: SAN 127.0.0.1 and localhost)."""
    root.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                "-days", "2", "-subj", f"/CN=pacs-node test {ca}", cwd=root)
    (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca in (("node", "ca"), ("client", "ca"), ("storescp", "ca"), ("rogue", "rogue-ca")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=root)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=root)
    return root


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Path, name: str = "client", ca: str = "ca") -> TlsSettings:
    return TlsSettings(certificate=pki / f"{name}.pem", private_key=pki / f"{name}.key",
                       ca_certificates=pki / f"{ca}.pem")


def tiny_instance(path: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "TLS-TEST"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(64))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def tls_echo(port: int, tls: TlsSettings | None, calling: str = "TLSSCU") -> str:
    """'ok', 'rejected' or 'no association' for a C-ECHO over TLS (plain TCP when tls is None)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 15
    args = (client_context(tls), "127.0.0.1") if tls else None
    assoc, rejection = associate_noting_rejection(ae, "127.0.0.1", port, ae_title="PACSNODE", tls_args=args)
    if not assoc.is_established:
        return "rejected" if rejection is not None else "no association"
    status = assoc.send_c_echo()
    assoc.release()
    return "ok" if status and status.Status == 0 else "failed"


def test_mutual_tls_serves_good_certificates_and_refuses_others(node_factory, pki, tmp_path):
    tls = {"certificate": str(pki / "node.pem"), "private_key": str(pki / "node.key"),
           "ca_certificates": str(pki / "ca.pem"), "require_client_certificate": True}
    node = node_factory(PEERS, [], tls=tls)
    # logged just after the TLS listener opens (the fixture returns once the plain port is open)
    wait_for(lambda: "listening for DICOM TLS" in node.log(), 30, "the TLS listener's log line")

    # a good client certificate: echo and store over TLS
    assert tls_echo(node.port, tls_settings(pki)) == "ok"
    src = tiny_instance(tmp_path / "tiny.dcm")
    report = send_files([src], "TLSSCU", "PACSNODE", "127.0.0.1", node.port, 15, tls=client_context(tls_settings(pki)))
    assert len(report.ok) == 1 and not report.rejected
    stored = list((node.root / "storage" / "instances").rglob("*.dcm"))
    assert len(stored) == 1 and pydicom.dcmread(stored[0]).SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID

    # DCMTK echoscu with its own TLS stack, good certificate
    echo = [tool("echoscu"), "-aet", "ECHOSCU", "-aec", "PACSNODE", "-to", "15", "-ta", "15"]
    good = subprocess.run(echo + ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem"),
                                  "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stdout + good.stderr

    # refused: no client certificate (DCMTK anonymous TLS, pynetdicom without cert), a rogue CA, plain TCP
    anon = subprocess.run(echo + ["+tla", "+cf", str(pki / "ca.pem"), "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=60)
    assert anon.returncode != 0
    no_cert = TlsSettings(ca_certificates=pki / "ca.pem")
    assert tls_echo(node.port, no_cert) != "ok"
    assert tls_echo(node.port, tls_settings(pki, "rogue")) != "ok"
    assert tls_echo(node.port, None) != "ok"
    # an unknown AE title with a good certificate: TLS lets it in, access control still rejects it
    assert tls_echo(node.port, tls_settings(pki), calling="INTRUDER") == "rejected"

    # and the node still serves the good client
    assert tls_echo(node.port, tls_settings(pki)) == "ok"
    assert node.proc.poll() is None


def test_silent_caller_does_not_block_the_tls_listener(node_factory, pki):
    import socket

    tls = {"certificate": str(pki / "node.pem"), "private_key": str(pki / "node.key"),
           "ca_certificates": str(pki / "ca.pem"), "require_client_certificate": True}
    node = node_factory(PEERS, [], tls=tls)
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        assert tls_echo(node.port, tls_settings(pki)) == "ok"
    finally:
        for s in silent:
            s.close()


def test_plain_and_tls_listeners_side_by_side(node_factory, pki):
    tls_port = free_port()
    tls = {"certificate": str(pki / "node.pem"), "private_key": str(pki / "node.key"), "port": tls_port}
    node = node_factory(PEERS, [], tls=tls)
    wait_for(lambda: port_open(tls_port), 30, "the TLS listener")
    assert tls_echo(node.port, None) == "ok"
    # server-only TLS: a client without a certificate is served, after verifying the node
    assert tls_echo(tls_port, TlsSettings(ca_certificates=pki / "ca.pem")) == "ok"
    # a client that trusts another CA refuses the node's certificate
    assert tls_echo(tls_port, TlsSettings(ca_certificates=pki / "rogue-ca.pem")) != "ok"


@contextlib.contextmanager
def tls_storescp(pki: Path, root: Path):
    """DCMTK storescp speaking TLS only and requiring a client certificate from our CA."""
    out = root / "received"
    out.mkdir(parents=True)
    port = free_port()
    log = open(root / "storescp.log", "wb")
    scp = subprocess.Popen([tool("storescp"), "-aet", "STORESCP", "-od", str(out), "+tls", str(pki / "storescp.key"),
                            str(pki / "storescp.pem"), "+cf", str(pki / "ca.pem"), "-rc", str(port)],
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(port), 20, "storescp (TLS) to listen")
        yield port, out
    finally:
        scp.terminate()
        scp.wait(10)
        log.close()


def test_results_sent_over_tls_to_a_dcmtk_storescp_that_requires_our_certificate(pki, tmp_path):
    with tls_storescp(pki, tmp_path) as (port, out):
        src = tiny_instance(tmp_path / "tiny.dcm")
        peer = Peer(name="viewer", ae_title="STORESCP", host="127.0.0.1", port=port, tls=True)
        ctx = context_for_peer(tls_settings(pki, "node"), peer)
        report = send_files([src], "PACSNODE", "STORESCP", "127.0.0.1", port, 15, tls=ctx)
        assert len(report.ok) == 1
        assert len(list(out.iterdir())) == 1
        # without our certificate storescp refuses the handshake: a SendError, not a hang
        with pytest.raises(SendError):
            send_files([src], "PACSNODE", "STORESCP", "127.0.0.1", port, 15,
                       tls=client_context(TlsSettings(ca_certificates=pki / "ca.pem")))
        # a storescp whose certificate our CA did not sign is refused by us
        with pytest.raises(SendError):
            send_files([src], "PACSNODE", "STORESCP", "127.0.0.1", port, 15,
                       tls=client_context(tls_settings(pki, "node", ca="rogue-ca")))
        assert context_for_peer(tls_settings(pki), Peer(name="p", ae_title="P")) is None


def test_tls_config_errors_name_the_key(pki, tmp_path):
    with pytest.raises(ConfigError, match=r"tls\.certificate"):
        parse({"tls": {"certificate": str(tmp_path / "missing.pem"), "private_key": str(pki / "node.key")}})
    with pytest.raises(ConfigError, match=r"tls\.ca_certificates"):
        parse({"tls": {"certificate": str(pki / "node.pem"), "private_key": str(pki / "node.key"),
                       "require_client_certificate": True}})
    with pytest.raises(ConfigError, match=r"peers\[0\]\.tls"):
        parse({"peers": [{"name": "v", "ae_title": "V", "host": "h", "port": 1, "tls": True}]})
    settings = parse({"tls": {"certificate": "node.pem", "private_key": "node.key", "ca_certificates": "ca.pem"},
                      "peers": [{"name": "v", "ae_title": "V", "host": "h", "port": 1, "tls": True}]}, base_dir=pki)
    assert settings.tls.certificate == pki / "node.pem" and settings.peers[0].tls


def test_node_delivers_job_results_over_tls_to_a_tls_peer(node_factory, pki, tmp_path, ge_head):
    from conftest import storescu

    with tls_storescp(pki, tmp_path / "dest") as (port, out):
        tls = {"certificate": str(pki / "node.pem"), "private_key": str(pki / "node.key"),
               "ca_certificates": str(pki / "ca.pem"), "port": free_port()}
        peers = [{"name": "modality", "ae_title": "STORESCU"},
                 {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port, "tls": True}]
        rules = [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical", "destinations": ["viewer"]}]
        node = node_factory(peers, rules, tls=tls)
        assert storescu(node.port, *sorted(ge_head.glob("*.dcm"))[:2]).returncode == 0  # plain listener in
        wait_for(lambda: len(list(out.iterdir())) == 2, 120, "results delivered over TLS")
        # storescp has the files before the node has its last response and logs the delivery
        wait_for(lambda: "delivered to viewer" in node.log(), 30, "the delivery in the node's log")
