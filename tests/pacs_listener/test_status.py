from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, Status, code_to_category

from pacs_listener.status import StoreStatus, describe, is_success


def test_every_status_we_answer_is_a_storage_service_status():
    for status in StoreStatus:
        assert int(status) in STORAGE_SERVICE_CLASS_STATUS, status


def test_categories_and_descriptions():
    assert StoreStatus.SUCCESS == Status.SUCCESS
    assert is_success(StoreStatus.SUCCESS) and not is_success(StoreStatus.OUT_OF_RESOURCES)
    assert code_to_category(StoreStatus.OUT_OF_RESOURCES) == "Failure"
    assert code_to_category(StoreStatus.COERCION_OF_DATA_ELEMENTS) == "Warning"
    assert describe(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS) == "Failure: Data Set Does Not Match SOP Class"
    assert describe(StoreStatus.CANNOT_UNDERSTAND) == "Failure: Cannot Understand"
    assert "unknown" in describe(0x1234)
