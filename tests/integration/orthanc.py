"""A real Orthanc PACS for integration tests, started inside a :class:`NetNamespace`.

Installed here: Debian ``orthanc`` 1.10.1 (``/usr/sbin/Orthanc``) and ``orthanc-dicomweb`` 1.7
(``/usr/share/orthanc/plugins/libOrthancDicomWeb.so``). ``Orthanc --config=FILE`` writes the default
configuration with every key this version supports.

The generated configuration makes Orthanc behave like a locked-down hospital PACS:

* HTTP on loopback only (``RemoteAccessAllowed: false``; the namespace's loopback is private anyway),
  ``AuthenticationEnabled: false``.
* DICOM AE ``ORTHANC``; ``DicomCheckCalledAet: true`` (callers must call ``ORTHANC``).
* ``DicomModalities`` is the allow-list: ``DicomAlwaysAllowStore: false`` and ``DicomAlwaysAllowEcho: false``
  so an unknown calling AE can neither store nor echo; ``DicomCheckModalityHost: true`` so the AE must also
  come from its declared host. Each modality may C-ECHO and C-STORE, nothing else (no FIND/MOVE/GET).
* Storage and index in a temporary directory; ``SaveJobs: false``; ``OverwriteInstances: true``.
* The DICOMweb plugin is loaded when present (optional: nothing here depends on it).

REST calls go through ``NetNamespace.call`` (a thread inside the namespace) with ``requests``.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import requests

from tests.integration.netns import NetNamespace, stop_process, tail

ORTHANC_BIN = "/usr/sbin/Orthanc"
PLUGINS_DIR = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGINS_DIR / "libOrthancDicomWeb.so"


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc knows (and therefore accepts associations from)."""

    aet: str
    host: str = "127.0.0.1"
    port: int = 104
    tls: bool = False  # Orthanc talks to it over DICOM TLS (needs DicomTls* in the server's configuration)

    def as_config(self) -> dict[str, Any]:
        return {
            "UseDicomTls": self.tls,
            "AET": self.aet,
            "Host": self.host,
            "Port": self.port,
            "AllowEcho": True,
            "AllowStore": True,
            "AllowFind": False,
            "AllowFindWorklist": False,
            "AllowGet": False,
            "AllowMove": False,
            "AllowStorageCommitment": False,
        }


class OrthancError(RuntimeError):
    pass


@dataclass
class OrthancServer:
    """One Orthanc process in ``ns``; see the module docstring for the configuration."""

    ns: NetNamespace
    workdir: Path
    modalities: dict[str, Modality] = field(default_factory=dict)
    aet: str = "ORTHANC"
    http_port: int = 8042
    dicom_port: int = 4242
    host: str = "127.0.0.1"
    load_dicomweb: bool = True
    extra_config: dict[str, Any] = field(default_factory=dict)  # merged last (e.g. DicomTls*)
    verbose: bool = True  # --verbose logging (off for benchmarks: a log line per instance costs time)
    process: subprocess.Popen | None = None

    # configuration --------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_loaded(self) -> bool:
        return self.load_dicomweb and DICOMWEB_PLUGIN.is_file()

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        cfg: dict[str, Any] = {
            "Name": "medgru-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": True,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {name: m.as_config() for name, m in self.modalities.items()},
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "UnknownSopClassAccepted": False,
            "TcpNoDelay": True,
            "SaveJobs": False,
            "OverwriteInstances": True,
            "StableAge": 5,
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb_loaded else [],
        }
        if self.dicomweb_loaded:
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        cfg.update(self.extra_config)
        return cfg

    # lifecycle ------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> "OrthancServer":
        assert Path(ORTHANC_BIN).is_file(), f"Orthanc not installed at {ORTHANC_BIN} (apt-get install orthanc)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "ab")
        try:
            self.process = self.ns.popen(
                [ORTHANC_BIN, *(["--verbose"] if self.verbose else []), str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
        finally:
            log.close()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with status {self.process.returncode} during start-up\n{tail(self.log_path)}"
                )
            try:
                return self.get("/system")
            except (requests.RequestException, OrthancError) as exc:
                last = exc
                time.sleep(0.2)
        raise OrthancError(f"Orthanc not answering /system after {timeout_s:.0f} s: {last}\n{tail(self.log_path)}")

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return stop_process(self.process, grace_s=20.0)

    def log_tail(self, max_chars: int = 20_000) -> str:
        return tail(self.log_path, max_chars)

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # raw REST ---------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, timeout: float = 120.0, **kwargs: Any) -> requests.Response:
        url = self.url + path
        response = self.ns.call(requests.request, method, url, timeout=timeout, **kwargs)
        if response.status_code >= 400:
            raise OrthancError(f"{method} {path} -> HTTP {response.status_code}: {response.text[:2000]}")
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None).json()

    def get_bytes(self, path: str, **params: Any) -> requests.Response:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, json_body: Any = None, data: bytes | None = None, **kw: Any) -> Any:
        if data is not None:
            response = self.request("POST", path, data=data, headers={"Content-Type": "application/dicom"}, **kw)
        else:
            response = self.request("POST", path, json=json_body, **kw)
        return response.json() if response.content else None

    def put(self, path: str, json_body: Any) -> Any:
        response = self.request("PUT", path, json=json_body)
        return response.json() if response.content else None

    # helpers ----------------------------------------------------------------------------------------
    def system(self) -> dict[str, Any]:
        return self.get("/system")

    def upload_file(self, path: Path) -> dict[str, Any]:
        """POST one DICOM file to /instances; returns Orthanc's answer (ID, ParentSeries, ParentStudy, Status)."""
        answer = self.post("/instances", data=Path(path).read_bytes())
        if not isinstance(answer, dict) or answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload of {path} was not stored: {answer}")
        return answer

    def upload_files(self, paths: Iterable[Path]) -> list[dict[str, Any]]:
        return [self.upload_file(p) for p in paths]

    def modalities_list(self) -> list[str]:
        return self.get("/modalities")

    def put_modality(self, name: str, modality: Modality) -> None:
        """Declare (or redeclare) a modality at run time (held in memory: DicomModalitiesInDatabase is false)."""
        self.put(f"/modalities/{name}", modality.as_config())
        self.modalities[name] = modality

    def echo(self, modality: str) -> None:
        """Orthanc C-ECHO SCU to a declared modality; raises OrthancError if it fails."""
        self.post(f"/modalities/{modality}/echo", {})

    def store_to_modality(self, modality: str, resources: list[str], timeout: float = 300.0) -> dict[str, Any]:
        """Orthanc C-STORE SCU: send studies/series/instances (Orthanc ids) to ``modality``, synchronously."""
        return self.post(
            f"/modalities/{modality}/store",
            {"Resources": resources, "Synchronous": True},
            timeout=timeout,
        )

    def studies(self) -> list[str]:
        return self.get("/studies")

    def study(self, study_id: str) -> dict[str, Any]:
        return self.get(f"/studies/{study_id}")

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """Every series of a study, expanded (ID, MainDicomTags incl. Modality/Manufacturer, Instances)."""
        return self.get(f"/studies/{study_id}/series")

    def series(self, series_id: str) -> dict[str, Any]:
        return self.get(f"/series/{series_id}")

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        return self.get(f"/series/{series_id}/instances")

    def instance_tags(self, instance_id: str, simplify: bool = True) -> dict[str, Any]:
        suffix = "?simplify" if simplify else ""
        return self.request("GET", f"/instances/{instance_id}/tags{suffix}").json()

    def instance_preview_png(self, instance_id: str) -> bytes:
        response = self.request("GET", f"/instances/{instance_id}/preview", headers={"Accept": "image/png"})
        return response.content

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file").content

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc ids of the resources with this DICOM UID (/tools/lookup)."""
        return self.request("POST", "/tools/lookup", data=uid).json()

    def series_id_for_uid(self, series_uid: str) -> str | None:
        for hit in self.lookup(series_uid):
            if hit.get("Type") == "Series":
                return hit["ID"]
        return None

    def statistics(self) -> dict[str, Any]:
        return self.get("/statistics")

