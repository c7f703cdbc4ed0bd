"""deploy/: what can run without a Docker engine or systemd runs here."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import subprocess
from pathlib import Path

import pydicom
import yaml

from conftest import Orthanc, free_port, wait_for
from pacs_node.cli import build_parser
from pacs_node.config import load

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_compose_file_parses_and_wires_receiver_worker_postgres_orthanc():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "orthanc", "receiver", "worker"}
    assert "--no-worker" in services["receiver"]["command"]
    assert services["worker"]["command"][:2] == ["pacs-node", "worker"]
    for name in ("receiver", "worker"):
        build = services[name]["build"]
        assert (DEPLOY.parent / build["dockerfile"]).exists()
        build_parser().parse_args(services[name]["command"][1:])
    modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    settings = load(DEPLOY / "compose" / "config.toml")
    assert modalities["pacsnode"][0] == settings.node.ae_title
    assert modalities["pacsnode"][2] == settings.node.port
    assert settings.node.database_url.startswith("postgresql+psycopg://")


def test_systemd_units_run_real_commands():
    for unit in ("pacs-node.service", "pacs-node-worker@.service"):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(DEPLOY / unit)
        argv = shlex.split(parser["Service"]["ExecStart"].replace("%i", "0"))
        assert argv[0].endswith("/bin/pacs-node")
        build_parser().parse_args(argv[1:])


def test_container_build_script_runs(tmp_path):
    text = (DEPLOY / "Containerfile").read_text()
    assert "deploy/build.sh" in text and "ARG VARIANT=cpu" in text and "base-${VARIANT}" in text
    env = {**os.environ, "SKIP_APT": "1", "PIP_FLAGS": "--dry-run", "TORCH_CPU_INDEX": "",
           "PREFIX": str(tmp_path / "venv"), "VARIANT": "cpu"}
    out = subprocess.run(["bash", str(DEPLOY / "build.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pacs-node installed" in out.stdout
    bad = subprocess.run(["bash", str(DEPLOY / "build.sh")], env={**env, "VARIANT": "tpu"}, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "VARIANT must be cpu or cuda" in bad.stderr


def test_orthanc_autoforward_script_sends_ct_and_not_results_back(tmp_path, node_factory, ge_head):
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port)
    config = json.loads((orthanc.root / "orthanc.json").read_text())
    config["LuaScripts"] = [str(DEPLOY / "compose" / "autoforward.lua")]
    config["StableAge"] = 5  # the three uploads below form one stable series even on a loaded machine
    (orthanc.root / "orthanc.json").write_text(json.dumps(config))
    orthanc.start()
    try:
        peers = [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}]
        rules = [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical", "destinations": ["sender"]}]
        node = node_factory(peers, rules, port=node_port)
        for path in sorted(ge_head.glob("*.dcm"))[:3]:
            orthanc.post("/instances", path.read_bytes(), "application/dicom")
        study = orthanc.get("/studies")[0]
        wait_for(lambda: len(orthanc.get(f"/studies/{study}")["Series"]) == 2, 180, "the result series in Orthanc")
        # the result series is stable after StableAge; it must not be forwarded back to the node
        wait_for(lambda: all(orthanc.get(f"/series/{s}")["IsStable"] for s in orthanc.get(f"/studies/{study}")["Series"]),
                 60, "both series stable")
        import time
        time.sleep(5)
        assert node.log().count("complete (quiet)") == 1
        assert "forwarding series" in (orthanc.root / "orthanc.log").read_text()
    finally:
        orthanc.stop()
