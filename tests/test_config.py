"""Config: the shipped file loads; every mistake names its key."""

from pathlib import Path

import pytest

from pacs_node.config import load, parse
from pacs_node.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_loads_with_documented_defaults():
    settings = load(REPO / "config.toml")
    assert settings.node.ae_title == "PACSNODE"
    assert settings.node.database_url.startswith("sqlite:///")
    assert settings.node.storage_dir.is_absolute()
    assert settings.completion.quiet_seconds == 1.5
    assert settings.rules[0].pipeline == "ct-denoise-classical"
    # every key of the shipped file's sections is a real setting (unknown keys raise), and
    # every setting is documented in it
    text = (REPO / "config.toml").read_text()
    for section in ("node", "completion", "send", "worker"):
        for key in getattr(settings, section).__dataclass_fields__:
            assert f"\n{key} =" in text, f"[{section}] {key} is not documented in config.toml"


@pytest.mark.parametrize(
    "data, key",
    [
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"port": "104"}}, "node.port"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
        ({"node": {"aetitle": "X"}}, "node.aetitle"),
        ({"completion": {"quiet_seconds": -1}}, "completion.quiet_seconds"),
        ({"peers": [{"name": "x"}]}, "peers[0].ae_title"),
        ({"peers": [{"name": "sender", "ae_title": "X"}]}, "peers[0].name"),
        ({"rules": [{"name": "r", "when": "True", "pipeline": "p", "destinations": ["nowhere"]}]}, "rules[0].destinations"),
        ({"rules": [{"name": "r", "when": "True", "pipeline": "p", "priority": "urgent"}]}, "rules[0].priority"),
    ],
)
def test_errors_name_the_bad_key(data, key):
    with pytest.raises(ConfigError) as err:
        parse(data)
    assert err.value.key == key
    assert key in str(err.value)


def test_missing_file_and_bad_toml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)
