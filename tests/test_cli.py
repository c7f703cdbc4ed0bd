"""The command line: rules test explains, send sends, errors are one clear line."""

import subprocess
import sys
from pathlib import Path

from conftest import StoreSCP

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def pacs_node(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "pacs-node"), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_rules_test_explains_each_series(data, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('''
[[rules]]
name = "thin-ct"
when = "Modality == 'CT' and SliceThickness <= 2"
pipeline = "ct-denoise-classical"
destinations = []
[[rules]]
name = "any-ct"
when = "Modality == 'CT'"
pipeline = "ct-denoise-classical"
destinations = []
''')
    out = pacs_node("rules", "test", str(data / "ct" / "ge-head-tilt"), str(data / "compressed" / "transfer-syntaxes" / "1.dcm"),
                    "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "(CT, 28 instance(s))" in out.stdout
    assert "no match: 'SliceThickness <= 2' is false with SliceThickness=4.0" in out.stdout
    assert "MATCH any-ct -> ct-denoise-classical" in out.stdout
    assert "(MR, 1 instance(s))" in out.stdout and "no rule matched" in out.stdout


def test_send_folder_to_dcmtk_storescp(ge_head, tmp_path):
    scp = StoreSCP(tmp_path / "scp").start()
    try:
        out = pacs_node("send", str(ge_head), "--port", str(scp.port), "--called-aet", "STORESCP")
        assert out.returncode == 0, out.stderr
        assert "sent 28 of 28" in out.stdout
        assert len(scp.files()) == 28
    finally:
        scp.stop()


def test_bad_config_is_one_clear_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[node]\nport = 99999\n")
    out = pacs_node("jobs", "list", "--config", str(cfg))
    assert out.returncode == 2
    assert out.stderr.strip() == "pacs-node: config key 'node.port': port 99999 out of range 1-65535"


def test_fresh_folders_are_created(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\ndatabase_url = "sqlite:///new/sub/node.db"\nstorage_dir = "new/storage"\n')
    out = pacs_node("jobs", "list", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "new" / "sub" / "node.db").exists()
