import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from medgru.settings import BUNDLED_MODELS_DIR, Destination, Settings, load_settings


def test_defaults_are_the_embedded_setup(tmp_path, monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("MEDGRU_"):
            monkeypatch.delenv(k)
    s = Settings(home=tmp_path)
    assert s.effective_database_url == f"sqlite:///{tmp_path / 'medgru.sqlite3'}"
    assert s.uses_embedded_broker
    assert s.model == [BUNDLED_MODELS_DIR]
    assert s.destination is None
    assert s.allowed_calling_aes == []


def test_environment_with_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDGRU_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("MEDGRU_AE_TITLE", "WORKER1")
    monkeypatch.setenv("MEDGRU_LISTEN_PORT", "11113")
    monkeypatch.setenv("MEDGRU_DESTINATION", "ORTHANC@10.0.0.5:4242")
    monkeypatch.setenv("MEDGRU_ALLOWED_CALLING_AES", "ORTHANC, STORESCU")
    monkeypatch.setenv("MEDGRU_QUIET_PERIOD_S", "2.5")
    monkeypatch.setenv("MEDGRU_MODEL", "/models/a,/models/b")
    s = Settings()
    assert s.home == (tmp_path / "h").resolve()
    assert s.ae_title == "WORKER1" and s.listen_port == 11113
    assert s.destination == Destination(ae_title="ORTHANC", host="10.0.0.5", port=4242)
    assert s.allowed_calling_aes == ["ORTHANC", "STORESCU"]
    assert s.quiet_period_s == 2.5
    assert s.model == [Path("/models/a"), Path("/models/b")]


def test_toml_file_is_read_and_environment_wins(monkeypatch, tmp_path):
    cfg = tmp_path / "medgru.toml"
    cfg.write_text('ae_title = "FROMTOML"\nlisten_port = 2000\ndestination = "PACS@pacs:104"\n')
    monkeypatch.delenv("MEDGRU_AE_TITLE", raising=False)
    monkeypatch.setenv("MEDGRU_LISTEN_PORT", "3000")
    s = load_settings(config_file=cfg, home=tmp_path)
    assert s.ae_title == "FROMTOML"
    assert s.listen_port == 3000
    assert str(s.destination) == "PACS@pacs:104"


@pytest.mark.parametrize("bad", ["ORTHANC", "ORTHANC@host", "A@h:0", "A@h:70000", "@h:104", "AVERYLONGAETITLE123@h:104"])
def test_bad_destination_is_refused_with_its_text(bad):
    with pytest.raises(ValidationError) as exc:
        Settings(destination=bad)
    assert "destination" in str(exc.value)


@pytest.mark.parametrize("text, host", [("PACS@[::1]:104", "::1"), ("PACS@[fd00:0::5]:11112", "fd00::5"),
                                        ("PACS@[fe80::1%eth0]:104", "fe80::1%eth0")])
def test_ipv6_destination_in_brackets(text, host):
    # the host of AET@host:port ended at the first colon, so an IPv6 PACS could not be configured at all
    dest = Settings(destination=text).destination
    assert dest.host == host  # bare, as the socket takes it
    assert Destination.parse(str(dest)) == dest  # the outbox stores str() and parses it back
    assert Destination(ae_title="PACS", host="[::1]", port=104).host == "::1"  # a TOML table's host


@pytest.mark.parametrize("bad", ["PACS@::1:104", "PACS@[nohost]:104", "PACS@[::1]104", "PACS@[1.2.3.4]:104"])
def test_ipv6_destination_needs_brackets_and_an_address(bad):
    with pytest.raises(ValidationError) as exc:
        Settings(destination=bad)
    assert "destination" in str(exc.value)


def test_settings_are_frozen(tmp_path):
    s = Settings(home=tmp_path)
    with pytest.raises(ValidationError):
        s.ae_title = "OTHER"


def test_a_copy_with_another_home_has_its_own_folders(make_settings, tmp_path):
    s = make_settings()
    s.ensure_dirs()  # reads every derived folder of the original first
    other = s.model_copy(update={"home": tmp_path / "other"})
    for name in ("spool_dir", "quarantine_dir", "outbox_dir", "broker_dir"):
        assert getattr(other, name).parent == tmp_path / "other", name
        assert getattr(s, name).parent == s.home, name


def test_routes_by_calling_ae(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDGRU_HOME", str(tmp_path))
    monkeypatch.setenv("MEDGRU_DESTINATION", "PACS@pacs:104")
    monkeypatch.setenv("MEDGRU_ROUTES", "SITE_A=PACS_A@10.0.0.1:104, SITE_B = PACS_B@h:11112")
    s = load_settings()
    assert s.destination_for("SITE_A") == Destination.parse("PACS_A@10.0.0.1:104")
    assert s.destination_for("SITE_B ") == Destination.parse("PACS_B@h:11112")
    assert s.destination_for("ELSE") == s.destination_for("") == Destination.parse("PACS@pacs:104")
    toml = tmp_path / "medgru.toml"
    toml.write_text('[routes]\nSITE_C = "PACS_C@c:4242"\n')
    monkeypatch.delenv("MEDGRU_ROUTES")
    monkeypatch.setenv("MEDGRU_CONFIG", str(toml))
    assert load_settings().routes == {"SITE_C": Destination.parse("PACS_C@c:4242")}
    for bad, says in (("SITE_A", "CALLING_AE=AET@host:port"), ("SITE_A=nowhere", "AET@host:port"),
                      ("WAY_TOO_LONG_FOR_AN_AE=P@h:1", "not an AE title")):
        monkeypatch.setenv("MEDGRU_ROUTES", bad)
        with pytest.raises(ValueError, match=says):
            load_settings()


def test_a_config_file_that_does_not_exist_is_refused(monkeypatch, tmp_path):
    """A mistyped path must not start the service on the defaults."""
    missing = tmp_path / "no-such.toml"
    with pytest.raises(SettingsError, match=f"config file {re.escape(str(missing))} .*does not exist"):
        load_settings(config_file=missing, home=tmp_path)
    monkeypatch.setenv("MEDGRU_CONFIG", str(missing))
    with pytest.raises(SettingsError, match="MEDGRU_CONFIG"):
        Settings(home=tmp_path)
    with pytest.raises(SettingsError, match="not a file"):
        load_settings(config_file=tmp_path, home=tmp_path)


@pytest.mark.parametrize("given, level", [("debug", "DEBUG"), (" Info ", "INFO"), ("warn", "WARNING"),
                                          ("Warning", "WARNING"), ("error", "ERROR"), ("CRITICAL", "CRITICAL")])
def test_log_level_is_read_case_insensitively(given, level, tmp_path):
    assert Settings(home=tmp_path, log_level=given).log_level == level


@pytest.mark.parametrize("bad", ["verbose", "", "10", "NOTSET"])
def test_a_log_level_the_embedded_worker_would_refuse_is_refused(bad, tmp_path):
    """Celery exits at once on a level it does not know: the supervisor would restart the worker for ever
    while the parent logs at INFO as if nothing were wrong."""
    with pytest.raises(ValidationError, match="log_level .* DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        Settings(home=tmp_path, log_level=bad)


@pytest.mark.parametrize("bad", ["MEDGRU_WORKSTATION_1", "", "    ", "MED\\GRU", "MED\tGRU", "MEDGRU\n", "MEDGRÜ"])
def test_ae_title_must_be_a_dicom_ae_title(bad, tmp_path):
    """pynetdicom refuses these only when the listener starts; the settings refuse them when they load."""
    with pytest.raises(ValidationError, match="ae_title .*not an AE title"):
        Settings(home=tmp_path, ae_title=bad)


def test_ae_title_spaces_around_it_are_not_significant(tmp_path):
    assert Settings(home=tmp_path, ae_title="  MY SCP  ").ae_title == "MY SCP"
    assert Settings(home=tmp_path, ae_title="A" * 16).ae_title == "A" * 16


@pytest.mark.parametrize("field, bad", [("listen_port", -1), ("listen_port", 70000),
                                        ("dashboard_port", -1), ("dashboard_port", 65536)])
def test_ports_out_of_range_are_refused(field, bad, tmp_path):
    with pytest.raises(ValidationError, match=field):
        Settings(home=tmp_path, **{field: bad})


def test_port_0_keeps_its_meaning(tmp_path):
    s = Settings(home=tmp_path, listen_port=0, dashboard_port=0)  # a free port (tests); no dashboard
    assert s.listen_port == 0 and s.dashboard_port == 0
    assert Settings(home=tmp_path, listen_port=65535, dashboard_port=1).listen_port == 65535


def test_destination_and_route_ae_titles_follow_the_same_rule(monkeypatch, tmp_path):
    assert Settings(home=tmp_path, destination="MY PACS  @h:104").destination.ae_title == "MY PACS"
    for bad in ("PACS\\1@h:104", "PACS\x01@h:104", "ABCDEFGHIJKLMNOPQ@h:104", "   @h:104"):
        with pytest.raises(ValidationError, match="destination"):
            Settings(home=tmp_path, destination=bad)
    with pytest.raises(ValidationError, match="not an AE title"):
        Settings(home=tmp_path, destination={"ae_title": "A" * 17, "host": "h", "port": 104})
    for bad in ("SITE\\A=PACS@h:104", "SITE_A=PA\\CS@h:104", "SITE\x7fA=PACS@h:104"):
        with pytest.raises(ValidationError, match="not an AE title"):
            Settings(home=tmp_path, routes=bad)
    toml = tmp_path / "medgru.toml"
    toml.write_text('[routes]\n"SITE\\\\A" = "PACS@h:104"\n')
    monkeypatch.setenv("MEDGRU_CONFIG", str(toml))
    with pytest.raises(ValidationError, match="not an AE title"):
        Settings(home=tmp_path)


def test_allowed_calling_aes_are_ae_titles(tmp_path):
    """An entry that is no AE title can never match a caller, so every peer would be refused with no hint:
    refused when the settings load; spaces around an entry are not significant."""
    assert Settings(home=tmp_path, allowed_calling_aes=" ORTHANC , STORESCU ").allowed_calling_aes == [
        "ORTHANC", "STORESCU"]
    for bad in ("ORTHANC,ABCDEFGHIJKLMNOPQ", "MOD\\1"):
        with pytest.raises(ValidationError, match="allowed_calling_aes entry .* not an AE title"):
            Settings(home=tmp_path, allowed_calling_aes=bad)


def test_a_misspelt_key_in_the_config_file_is_refused(tmp_path):
    """``listen_prot = 104`` was ignored: the service listened on the default port, silently."""
    cfg = tmp_path / "medgru.toml"
    cfg.write_text('listen_prot = 104\ndashbaord_password = "x"\nae_title = "OK"\n')
    with pytest.raises(SettingsError, match="unknown settings dashbaord_password, listen_prot"):
        load_settings(config_file=cfg, home=tmp_path)
    cfg.write_text("listen_port = [unclosed\n")
    with pytest.raises(SettingsError, match="medgru.toml"):
        load_settings(config_file=cfg, home=tmp_path)
    cfg.write_text('listen_port = 104\n[routes]\nCARDIO = "C@cardio:104"\n')  # a table is a setting too
    assert load_settings(config_file=cfg, home=tmp_path).listen_port == 104


def test_a_misspelt_environment_variable_is_said(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MEDGRU_RETENTION_DAY", "14")
    monkeypatch.setenv("MEDGRU_TEST_SOMETHING", "1")  # the test suite's own: not a misspelling
    with caplog.at_level("WARNING", logger="medgru.settings"):
        s = Settings(home=tmp_path)
    assert s.retention_days != 14
    assert "MEDGRU_RETENTION_DAY is no setting of medgru" in caplog.text and "TEST_SOMETHING" not in caplog.text


@pytest.mark.parametrize("given, device", [("auto", "auto"), ("", "auto"), (" CPU ", "cpu"), ("cuda", "cuda"),
                                            ("cuda:1", "cuda:1")])
def test_device_is_read_case_insensitively(given, device, tmp_path):
    assert Settings(home=tmp_path, device=given).device == device


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "mps"])
def test_a_device_torch_would_refuse_at_every_job_is_refused(bad, tmp_path):
    with pytest.raises(ValidationError, match="is not auto, cpu, cuda or cuda:N"):
        Settings(home=tmp_path, device=bad)


def test_a_route_for_a_sender_the_allow_list_refuses_is_refused(tmp_path):
    """Its associations are rejected, so the route could never be used."""
    with pytest.raises(ValidationError, match="routes name CARDIO_PACS, which allowed_calling_aes"):
        Settings(home=tmp_path, allowed_calling_aes=["ORTHANC"], routes={"CARDIO_PACS": "CARDIO@cardio:104"})
    ok = Settings(home=tmp_path, allowed_calling_aes=["ORTHANC", "CARDIO_PACS"], routes={"CARDIO_PACS": "CARDIO@cardio:104"})
    assert str(ok.destination_for("CARDIO_PACS")) == "CARDIO@cardio:104"
    assert Settings(home=tmp_path, routes={"CARDIO_PACS": "CARDIO@cardio:104"}).routes  # no allow-list: any sender


def test_a_stale_job_limit_a_live_worker_could_reach_is_refused(tmp_path):
    """The sweeper queues again a RUNNING job whose heartbeat is job_stale_after_s old: a limit within a few
    heartbeats would take a live worker's job for an orphan and run it twice."""
    s = Settings(home=tmp_path)
    assert (s.job_heartbeat_s, s.job_stale_after_s) == (30.0, 300.0)
    with pytest.raises(ValidationError, match="job_stale_after_s"):
        Settings(home=tmp_path, job_heartbeat_s=60.0, job_stale_after_s=120.0)
