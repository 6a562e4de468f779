"""One typed settings object, built once per process and passed in.

Values come, highest priority first, from keyword arguments, environment variables with the ``MEDGRU_``
prefix, a TOML file named by ``MEDGRU_CONFIG`` (or passed as ``config_file``), then the defaults below.
Nothing deep inside the code reads the environment: the composition roots (``medgru.cli``, the Celery
app) call :func:`load_settings` once and hand the object down.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    NoDecode,
    TomlConfigSettingsSource,
)

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "inference" / "bundled"

#: the levels both Python's logging and the embedded Celery worker accept (``--loglevel``)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_LEVEL_ALIASES = {"WARN": "WARNING"}

#: ``AET@host:port``, the host a name, an IPv4 address or an IPv6 address in brackets (``PACS@[fd00::5]:104``,
#: as in a URL: the port follows the last colon)
_AE_RE = re.compile(r"^(?P<aet>[^@]+)@(?:\[(?P<host6>[^\[\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")
#: DICOM VR AE: 1 to 16 characters of the default repertoire (printable ASCII) but the backslash
_AE_TITLE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


def check_ae_title(value: str, what: str) -> str:
    """``value`` as a DICOM AE title, without the leading and trailing spaces (not significant in VR AE);
    ``ValueError`` naming ``what`` if it is not one. pynetdicom refuses such a title only when the listener
    or the sender starts; the settings refuse it when they load."""
    title = value.strip(" ")
    if not _AE_TITLE_RE.fullmatch(title):
        raise ValueError(f"{what} {value!r} is not an AE title: 1 to 16 characters of printable ASCII "
                         "(no backslash, no control character)")
    return title


class Destination(BaseModel):
    """A DICOM peer given as ``AET@host:port`` (an IPv6 address in brackets: ``AET@[::1]:104``)."""

    ae_title: str
    host: str
    port: int

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:  # also a destination given as a TOML table
        return check_ae_title(value, "destination AE title")

    @field_validator("host")
    @classmethod
    def _bare_host(cls, value: str) -> str:  # a TOML table's host = "[fd00::5]": the socket takes it bare
        value = value.strip()
        return value[1:-1] if value.startswith("[") and value.endswith("]") else value

    @classmethod
    def parse(cls, text: str) -> "Destination":
        m = _AE_RE.match(text.strip())
        if not m:
            raise ValueError(f"destination {text!r} is not of the form AET@host:port "
                             "(an IPv6 address in brackets: AET@[fd00::5]:104)")
        aet = check_ae_title(m["aet"], f"destination {text!r}:")
        host = m["host"]
        if m["host6"] is not None:
            try:
                host = str(ipaddress.IPv6Address(m["host6"]))
            except ValueError:
                raise ValueError(f"destination {text!r}: {m['host6']!r} in brackets is not an IPv6 address") from None
        port = int(m["port"])
        if not 0 < port < 65536:
            raise ValueError(f"destination {text!r}: port {port} out of range")
        return cls(ae_title=aet, host=host, port=port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every knob of the service. Environment: ``MEDGRU_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(
        env_prefix="MEDGRU_", extra="ignore", frozen=True, validate_default=True,
        # a validation error must not print the input: with a model validator's error that is the whole
        # dict of settings, secrets included (MEDGRU_DASHBOARD_PASSWORD, a database URL's password)
        hide_input_in_errors=True,
    )

    # where we keep things
    home: Path = Field(default=Path("~/.medgru"), description="spool, quarantine, outbox, SQLite")
    data_root: Path | None = Field(default=None, description="folder of the benchmark sets (shared/data)")

    # DICOM listener
    ae_title: str = Field(default="MEDGRU", description="our AE title: 1 to 16 characters, no backslash")
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=11112, ge=0, le=65535, description="0 picks a free port")
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="calling AE titles allowed to associate; empty = accept all"
    )
    quiet_period_s: float = Field(default=10.0, ge=0.0, description="a series is complete after this much quiet")
    min_free_disk_mb: float = Field(
        default=1000.0, ge=0.0,
        description="below this much free space on the spool's disk the listener answers 0xA700 (out of "
                    "resources, retried by the PACS) and writes nothing; 0 turns the check off")
    max_instance_mb: float = Field(
        default=1024.0, gt=0.0,
        description="the most one C-STORE request (its command and data set) may carry; the listener holds a "
                    "request in memory until it is complete, so a larger one (or one that never ends) has its "
                    "association aborted")
    add_prior_study: bool = Field(
        default=False, description="prepend the patient's latest prior study of the same modality as earlier frames"
    )
    reject_revised_results: bool = Field(
        default=False,
        description="when a series is scored again from other frames (a late slice), also send an IHE IOCM "
                    "rejection note (Key Object Selection, 'Rejected for Quality Reasons') listing the earlier "
                    "SR and SC of the same model version, so that a PACS with IOCM hides them; a PACS without "
                    "IOCM shows the note as one more object of the study")

    # DICOM over TLS (medgru/tls.py)
    listen_tls: bool = Field(default=False, description="the listener accepts TLS only, peers with a trusted certificate")
    send_tls: bool = Field(default=False, description="send results to the destination over TLS")
    tls_certificate: Path | None = Field(default=None, description="our certificate (PEM)")
    tls_private_key: Path | None = Field(default=None, description="its private key (PEM)")
    tls_trusted_certificates: Path | None = Field(
        default=None, description="PEM bundle of the CAs / peer certificates we trust (senders and the PACS)")
    tls_verify_hostname: bool = Field(default=True, description="the PACS certificate must name its host")

    # results destination
    destination: Destination | None = None
    routes: Annotated[dict[str, Destination], NoDecode] = Field(
        default_factory=dict,
        description="where the results of a series go by the calling AE that sent it, instead of destination: "
                    "'CALLING_AE=AET@host:port' entries, comma separated in the environment (a TOML table)",
    )
    send_retry_base_s: float = 2.0
    send_retry_max_s: float = 300.0

    # database and queue
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite under home")
    broker_url: str | None = Field(default=None, description="Celery broker; default a filesystem transport under home")
    job_max_retries: int = 3
    job_retry_backoff_s: float = 5.0
    requeue_check_s: float = Field(
        default=60.0, gt=0.0,
        description="how often the service looks for jobs waiting with no message to deliver them")
    requeue_after_s: float = Field(
        default=300.0, ge=0.0,
        description="a job QUEUED (or RETRYING past its retry_at) this long is enqueued again: its enqueue may "
                    "have failed (broker away); a duplicate message is harmless, so this only needs to exceed "
                    "the time a message takes to reach a worker")
    job_heartbeat_s: float = Field(
        default=30.0, gt=0.0, description="a worker running a job stamps the job's heartbeat this often")
    job_stale_after_s: float = Field(
        default=300.0, gt=0.0,
        description="a RUNNING job whose heartbeat is this old is orphaned (its worker was killed, ran out of "
                    "memory, lost its host) and the service queues it again (FAILED once its attempts are used "
                    "up); at least 3 x job_heartbeat_s")

    # models
    model: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [BUNDLED_MODELS_DIR],
        description="model folders, or folders of model folders; comma separated in the environment",
    )
    device: str = Field(default="auto", description="torch device for inference: auto, cpu or cuda")

    # retention (0 keeps files for ever; rows stay in the database either way)
    retention_days: float = Field(
        default=0.0, ge=0.0,
        description="remove received instances' spool files and sent results' files this many days after the "
                    "series' last instance (resp. the send), once no waiting, running or failed job needs them; "
                    "0 keeps them",
    )
    quarantine_retention_days: float = Field(
        default=0.0, ge=0.0, description="remove quarantined files this many days after receipt; 0 keeps them"
    )
    prune_interval_s: float = Field(default=3600.0, gt=0.0, description="how often the service applies retention")

    # admin surfaces
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(default=8080, ge=0, le=65535, description="0: no dashboard")
    dashboard_https: bool = Field(
        default=False, description="serve the dashboard over HTTPS with tls_certificate / tls_private_key")
    dashboard_user: str = "admin"
    dashboard_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="more host names the dashboard answers to (the Host header of a reverse proxy or port "
                    "forward), besides dashboard_host, loopback names and, on 0.0.0.0, this machine's name and "
                    "addresses; comma separated in the environment",
    )
    dashboard_password: SecretStr | None = Field(
        default=None,
        description="HTTP Basic password of the dashboard, /api and /metrics (not /healthz); required when "
                    "dashboard_host is not a loopback address",
    )
    log_level: str = Field(default="INFO", description=f"one of {', '.join(LOG_LEVELS)} (any case; WARN = WARNING)")

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_log_level(cls, value: Any) -> Any:
        """Upper case, from a known list: logging fell back to INFO on an unknown name without a word, while
        Celery refuses it, so the embedded worker exited at once, again at every restart, and ran no job."""
        if not isinstance(value, str):
            return value  # the str field refuses it
        level = value.strip().upper()
        level = _LOG_LEVEL_ALIASES.get(level, level)
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level {value!r} is not one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return check_ae_title(value, "ae_title")

    @field_validator("device", mode="before")
    @classmethod
    def _known_device(cls, value: Any) -> Any:
        """auto, cpu, cuda or cuda:N (any case): another name loaded, and then every job failed in torch."""
        if not isinstance(value, str):
            return value  # the str field refuses it
        device = value.strip().lower() or "auto"  # empty: auto, as inference.device.resolve_device reads it
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"device {value!r} is not auto, cpu, cuda or cuda:N")
        return device

    @field_validator("destination", mode="before")
    @classmethod
    def _parse_destination(cls, value: Any) -> Any:
        if isinstance(value, str):
            return Destination.parse(value) if value.strip() else None
        return value

    @field_validator("routes", mode="before")
    @classmethod
    def _parse_routes(cls, value: Any) -> Any:
        if isinstance(value, str):
            entries = {}
            for entry in _split_list(value):
                calling_ae, sep, target = entry.partition("=")
                if not sep or not calling_ae.strip():
                    raise ValueError(f"route {entry!r} is not of the form CALLING_AE=AET@host:port")
                entries[calling_ae] = target
            value = entries
        if isinstance(value, dict):
            routes = {}
            for calling_ae, target in value.items():
                key = check_ae_title(str(calling_ae).strip(), "route key")
                routes[key] = Destination.parse(target) if isinstance(target, str) else target
            return routes
        return value

    def destination_for(self, calling_ae: str) -> Destination | None:
        """Where the results of a series sent by ``calling_ae`` go: its route, else ``destination``."""
        return self.routes.get((calling_ae or "").strip(), self.destination)

    @field_validator("allowed_calling_aes", "model", "dashboard_allowed_hosts", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _allowed_are_ae_titles(cls, value: list[str]) -> list[str]:
        # an entry that is no AE title (17 characters, say) can never match a caller: every peer, the
        # one meant too, would be refused with no hint why
        return [check_ae_title(str(v), "allowed_calling_aes entry") for v in value]

    @model_validator(mode="after")
    def _routed_senders_are_allowed(self) -> "Settings":
        """A route for a calling AE that the allow-list refuses could never be used: its sender's
        associations are rejected, so nothing of it is ever received."""
        if self.allowed_calling_aes:
            refused = [ae for ae in self.routes if ae not in self.allowed_calling_aes]
            if refused:
                raise ValueError(f"routes name {', '.join(refused)}, which allowed_calling_aes "
                                 f"({', '.join(self.allowed_calling_aes)}) refuses: add them to it, or drop the routes")
        return self

    @model_validator(mode="after")
    def _stale_after_exceeds_heartbeats(self) -> "Settings":
        """A live worker must not look dead: a heartbeat or two delayed (a busy database) is no orphan."""
        if self.job_stale_after_s < 3 * self.job_heartbeat_s:
            raise ValueError(f"job_stale_after_s ({self.job_stale_after_s:g}) must be at least 3 x job_heartbeat_s "
                             f"({self.job_heartbeat_s:g}): a live worker's job would be taken for an orphan")
        return self

    @model_validator(mode="after")
    def _dashboard_reachable_only_with_a_password(self) -> "Settings":
        if self.dashboard_port and not is_loopback(self.dashboard_host) and not self.dashboard_password:
            raise ValueError(
                f"dashboard_host {self.dashboard_host!r} lets other hosts reach the dashboard, whose buttons retry, "
                "cancel and re-send: set MEDGRU_DASHBOARD_PASSWORD (HTTP Basic, user MEDGRU_DASHBOARD_USER) or "
                "listen on 127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _tls_files_given(self) -> "Settings":
        needed: list[str] = []
        if self.listen_tls:
            needed += ["tls_certificate", "tls_private_key", "tls_trusted_certificates"]
        if self.send_tls:
            needed += ["tls_trusted_certificates"]
        if self.dashboard_https:
            needed += ["tls_certificate", "tls_private_key"]
        missing = [name for name in dict.fromkeys(needed) if getattr(self, name) is None]
        if missing:
            raise ValueError(f"TLS is on but {', '.join('MEDGRU_' + m.upper() for m in missing)} is not set")
        unreadable = [f"{name} {path}" for name in ("tls_certificate", "tls_private_key", "tls_trusted_certificates")
                      if (path := getattr(self, name)) is not None and not Path(path).is_file()]
        if unreadable and (self.listen_tls or self.send_tls or self.dashboard_https):
            raise ValueError(f"TLS file not found: {'; '.join(unreadable)}")
        return self

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("MEDGRU_CONFIG")
        if toml_path:
            # the TOML source skips a file that is not there: a mistyped path would run on the defaults
            path = Path(toml_path).expanduser()
            if not path.exists():
                raise SettingsError(f"config file {toml_path} (--config or MEDGRU_CONFIG) does not exist")
            if not path.is_file():
                raise SettingsError(f"config file {toml_path} (--config or MEDGRU_CONFIG) is not a file")
            _refuse_unknown_keys(path, settings_cls)
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        _warn_unknown_env(settings_cls)
        return tuple(sources)

    # derived locations (plain properties: a cached value would survive model_copy(update={"home": ...}) and
    # point the copy at the original's folders) -----------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.home / "quarantine"

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'medgru.sqlite3'}"

    @property
    def effective_broker_url(self) -> str:
        # kombu's filesystem transport ignores the host, but warns at every connection when there is none
        return self.broker_url or "filesystem://localhost//"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")

    def ensure_dirs(self) -> None:
        for d in (self.home, self.spool_dir, self.quarantine_dir, self.outbox_dir, self.broker_dir):
            d.mkdir(parents=True, exist_ok=True)


#: MEDGRU_* variables that are not settings: the config file's path, the settings and queue the embedded
#: worker inherits, and the test suite's and benchmarks' own
ENV_NOT_SETTINGS = ("MEDGRU_CONFIG", "MEDGRU_SETTINGS_JSON", "MEDGRU_WORKER_QUEUE", "MEDGRU_TEST_",
                    "MEDGRU_SPINE_LATENCY_OUT")


def _refuse_unknown_keys(path: Path, settings_cls: type[BaseSettings]) -> None:
    """A misspelt key (``listen_prot``) was ignored and its setting kept the default, silently."""
    import tomllib

    try:
        keys = set(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path}: {exc}") from exc
    unknown = sorted(keys - set(settings_cls.model_fields))
    if unknown:
        raise SettingsError(f"config file {path}: unknown setting{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(unknown)} (`medgru config` lists the settings)")


def _warn_unknown_env(settings_cls: type[BaseSettings]) -> None:
    """A misspelt variable (``MEDGRU_RETENTION_DAY``) is said on stderr; it is not refused, since other
    tools may set MEDGRU_* variables of their own."""
    known = {f"MEDGRU_{name.upper()}" for name in settings_cls.model_fields}
    unknown = sorted(k for k in os.environ if k.upper().startswith("MEDGRU_") and k.upper() not in known
                     and not k.upper().startswith(ENV_NOT_SETTINGS))
    if unknown:
        logging.getLogger(__name__).warning("environment: %s %s no setting of medgru (misspelt?); ignored",
                                            ", ".join(unknown), "is" if len(unknown) == 1 else "are")


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the process's settings. ``config_file`` sets ``MEDGRU_CONFIG`` for this build only."""
    if config_file is not None:
        old = os.environ.get("MEDGRU_CONFIG")
        os.environ["MEDGRU_CONFIG"] = str(config_file)
        try:
            return Settings(**overrides)
        finally:
            if old is None:
                os.environ.pop("MEDGRU_CONFIG", None)
            else:
                os.environ["MEDGRU_CONFIG"] = old
    return Settings(**overrides)
