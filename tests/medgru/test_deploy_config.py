from pathlib import Path

from medgru.settings import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_example_toml_is_valid_settings(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("MEDGRU_"):
            monkeypatch.delenv(k)
    s = load_settings(config_file=DEPLOY / "medgru.example.toml")
    assert s.destination is not None and s.destination.port == 4242
    assert s.allowed_calling_aes == ["ORTHANC"]
    assert s.effective_database_url.startswith("postgresql")
    assert not s.uses_embedded_broker
