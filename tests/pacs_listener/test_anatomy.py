import pytest

from pacs_listener.anatomy import resolve_body_part, resolve_from_text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Brain MRI axial", "BRAIN"),
        ("HEAD CT w/o contrast", "BRAIN"),
        ("IRM cérébrale T2", "BRAIN"),
        ("CRÂNE sans injection", "BRAIN"),
        ("Neuro^Routine", "BRAIN"),
        ("Skull AP", "BRAIN"),
        ("Schädel CT nativ", "BRAIN"),
        ("TC cranio", "BRAIN"),
        ("Chest PA", "CHEST"),
        ("THORAX 2 plans", "CHEST"),
        ("Radiographie pulmonaire", "CHEST"),
        ("Poumon face", "CHEST"),
        ("CT lung low dose", "CHEST"),
        ("Tórax PA", "CHEST"),
        ("IRM genou droit", "KNEE"),
        ("Knie MRT", "KNEE"),
        ("T1 Knee sag", "KNEE"),
        ("CT Abdomen", "ABDOMEN"),
        ("Axial EPI-FMRI (Interleaved I to S)", ""),
        ("", ""),
        ("hippocampus volumetry", ""),  # "hip" is a whole word only
    ],
)
def test_descriptions_resolve_multilingual_keywords(text, expected):
    assert resolve_from_text(text) == expected
    assert resolve_body_part(None, [text]) == expected


def test_body_part_examined_wins_and_is_normalised():
    assert resolve_body_part("HEAD", ["Knee"]) == "BRAIN"
    assert resolve_body_part("thorax", []) == "CHEST"
    assert resolve_body_part("SKULL", []) == "BRAIN"
    assert resolve_body_part("FOOT", ["brain"]) == "FOOT"  # unknown term kept as sent, upper-cased
    assert resolve_body_part("  ", ["IRM genou"]) == "KNEE"  # blank BodyPartExamined falls back


def test_descriptions_searched_in_order_first_match_wins():
    assert resolve_body_part("", [None, "", "Chest CT", "Brain"]) == "CHEST"
    assert resolve_body_part(None, ["Localizer", "IRM genou"]) == "KNEE"
