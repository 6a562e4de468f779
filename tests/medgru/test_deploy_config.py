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
    assert s.retention_days == 14 and s.quarantine_retention_days == 30


def test_alert_rules_name_only_exported_metrics(make_settings):
    """Every metric the example alerting rules use is one the dashboard's collector exports."""
    import re

    from prometheus_client import CollectorRegistry, generate_latest

    from medgru.dashboard import _DbCollector, _DiskCollector, _HealthCollector
    from storage.db import init_db, make_session_factory

    settings = make_settings()
    registry = CollectorRegistry()
    sf = make_session_factory(init_db(settings.effective_database_url))
    registry.register(_DbCollector(sf))
    registry.register(_DiskCollector(settings))
    registry.register(_HealthCollector(sf, None))
    # every family the collectors declare (a labelled one has no sample line while nothing is unsent)
    exported = {line.split()[2] for line in generate_latest(registry).decode().splitlines()
                if line.startswith("# TYPE ")}
    rules = (DEPLOY / "prometheus-alerts.yml").read_text()
    used = set(re.findall(r"\bmedgru_[a-z_]+", "\n".join(ln for ln in rules.splitlines() if "expr:" in ln)))
    assert len(used) >= 4 and used <= exported, used - exported


def test_alert_rules_take_increase_and_rate_of_counters_only(make_settings):
    """``increase()`` / ``rate()`` of a gauge reads every drop as a counter reset and fires: the failed-jobs
    gauge drops when an admin retries a job."""
    import re

    from prometheus_client import CollectorRegistry, generate_latest

    from medgru.dashboard import _DbCollector, _DiskCollector
    from storage.db import init_db, make_session_factory

    settings = make_settings()
    registry = CollectorRegistry()
    registry.register(_DbCollector(make_session_factory(init_db(settings.effective_database_url))))
    registry.register(_DiskCollector(settings))
    types = {parts[2]: parts[3] for parts in (line.split() for line in generate_latest(registry).decode().splitlines()
                                             if line.startswith("# TYPE "))}
    exprs = "\n".join(ln for ln in (DEPLOY / "prometheus-alerts.yml").read_text().splitlines() if "expr:" in ln)
    counted = re.findall(r"\b(?:increase|rate|irate)\(\s*(medgru_[a-z_]+)", exprs)
    assert counted, "no rule takes increase() or rate()"
    assert all(types.get(name) == "counter" for name in counted), {n: types.get(n) for n in counted}


def test_both_service_units_read_the_secrets_and_own_their_folders():
    """The worker builds the same settings as medgru serve: without the secrets file a TOML that opens
    the dashboard to other hosts is refused for want of its password."""
    for unit in ("medgru-serve.service", "medgru-worker@.service"):
        text = (DEPLOY / unit).read_text()
        assert "EnvironmentFile=-/etc/medgru/secrets.env" in text, unit
        assert "StateDirectory=medgru" in text and "ConfigurationDirectory=medgru" in text, unit


def test_both_units_start_after_and_stop_before_the_database_and_the_broker():
    """The worker unit was ordered after Redis only: at shutdown a local PostgreSQL could stop while a
    worker still ran a job, whose outcome then could not be recorded. After=network-online.target pulls
    nothing in without Wants=."""
    for unit in ("medgru-serve.service", "medgru-worker@.service"):
        lines = (DEPLOY / unit).read_text().splitlines()
        after = [ln.split("=", 1)[1].split() for ln in lines if ln.startswith("After=")]
        wants = [ln.split("=", 1)[1].split() for ln in lines if ln.startswith("Wants=")]
        assert after and {"postgresql.service", "redis-server.service", "network-online.target"} <= set(after[0]), unit
        assert wants and "network-online.target" in wants[0], unit


def test_alert_rules_pass_their_promtool_tests():
    """``promtool test rules``: each rule fires in the situation it names and stays quiet otherwise,
    evaluated by Prometheus itself over series that play the situation (``prometheus-alerts.test.yml``).
    promtool is a peer like Orthanc (Debian ``prometheus``; ``.ci/run`` installs it)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (apt-get install prometheus)"
    tests = Path(__file__).with_name("prometheus-alerts.test.yml")
    run = subprocess.run([promtool, "test", "rules", tests.name], cwd=tests.parent, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
