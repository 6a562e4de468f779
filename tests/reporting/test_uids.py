from __future__ import annotations

import pytest
from pydicom.uid import UID

from reporting.uids import derive_uid, is_valid_uid, result_uid

SERIES = "1.2.826.0.1.3680043.8.498.1234567890"


def test_derive_uid_is_deterministic_and_valid() -> None:
    a = derive_uid(SERIES, "medgru-svc", "1.0.0", "sr-instance")
    assert a == derive_uid(SERIES, "medgru-svc", "1.0.0", "sr-instance")
    assert a.startswith("2.25.")
    assert len(a) <= 64
    assert is_valid_uid(a)
    assert UID(a).is_valid
    assert not a[len("2.25."):].startswith("0")


@pytest.mark.parametrize("other", [
    (SERIES, "medgru-svc", "1.0.1", "sr-instance"),  # another model version
    (SERIES, "other-model", "1.0.0", "sr-instance"),  # another model
    (SERIES, "medgru-svc", "1.0.0", "sc-instance"),  # another object kind
    (SERIES + "1", "medgru-svc", "1.0.0", "sr-instance"),  # another source series
    (SERIES, "medgru-svc1", ".0.0", "sr-instance"),  # same characters, other split
])
def test_derive_uid_differs_for_different_inputs(other: tuple[str, ...]) -> None:
    assert derive_uid(SERIES, "medgru-svc", "1.0.0", "sr-instance") != derive_uid(*other)


def test_many_uids_are_valid_and_distinct() -> None:
    uids = {result_uid(f"1.2.3.{i}", "m", "1", "sr-series") for i in range(2000)}
    assert len(uids) == 2000
    assert all(is_valid_uid(u) and len(u) <= 64 for u in uids)


def test_derive_uid_rejects_bad_parts() -> None:
    with pytest.raises(ValueError, match="at least one"):
        derive_uid()
    with pytest.raises(ValueError, match="part 1 is empty"):
        derive_uid(SERIES, "")
    with pytest.raises(TypeError, match="part 1 must be a str"):
        derive_uid(SERIES, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("uid,ok", [("1.2.3", True), ("1.02.3", False), ("1..2", False), ("", False),
                                    ("1.2." + "1" * 61, False), ("0.1", True), ("1.2.a", False)])
def test_is_valid_uid(uid: str, ok: bool) -> None:
    assert is_valid_uid(uid) is ok
