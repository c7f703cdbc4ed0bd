"""Rules: sandboxed conditions, explanations that say why a rule did not match, no PHI shown."""

import pydicom
import pytest

from pacs_node.config import parse
from pacs_node.errors import ConfigError
from pacs_node.route import Router


def router(*whens: str) -> Router:
    rules = [{"name": f"r{i}", "when": w, "pipeline": "p", "destinations": []} for i, w in enumerate(whens)]
    return Router(parse({"rules": rules}).rules)


def ct(**extra) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Modality = "CT"
    ds.SliceThickness = "4.0"
    ds.SeriesDescription = "Head 4mm STD"
    ds.PatientName = "Doe^Jane"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def test_match_and_explain_the_failing_clause():
    r = router("Modality == 'CT' and SliceThickness <= 3", "Modality == 'CT' and contains(SeriesDescription, 'head')",
               "CallingAETitle == 'CT01'", "'PRIMARY' in ImageType")
    d = r.decide(ct(), calling_ae="STORESCU")
    assert [x.matched for x in d] == [False, True, False, True]
    assert d[0].reason == "no match: 'SliceThickness <= 3' is false with SliceThickness=4.0"
    assert "CallingAETitle='STORESCU'" in d[2].reason


def test_missing_attribute_does_not_match_and_says_so():
    d = router("BodyPartExamined == 'HEAD' and SliceThickness < 5", "KVP > 100").decide(ct())
    assert not d[0].matched and "BodyPartExamined=None" in d[0].reason
    assert not d[1].matched and "KVP missing" in d[1].reason


def test_patient_values_never_shown():
    d = router("PatientName == 'Doe^Jane'", "PatientName == 'x'").decide(ct())
    assert d[0].matched and d[1].matched is False
    assert all("Doe" not in x.reason and "<redacted>" in x.reason for x in d)


def test_no_code_execution_and_typos_rejected_at_load():
    with pytest.raises(ConfigError, match="not a DICOM keyword"):
        router("Modalty == 'CT'")
    with pytest.raises(ConfigError, match="syntax error"):
        router("Modality == ")
    with pytest.raises(ConfigError, match="__import__"):
        router("__import__('os').system('true') == 0")
    d = router("Modality.__class__ == 1").decide(ct())
    assert not d[0].matched and "could not be evaluated" in d[0].reason


def test_frame_attributes_of_a_multi_frame_image_are_routed_on():
    """Enhanced CT / MR keep SliceThickness, RepetitionTime ... in functional groups: a rule on
    them sees the first frame's value (its own groups before the shared ones)."""
    ds = ct()
    del ds.SliceThickness
    measures = pydicom.Dataset()
    measures.SliceThickness = "2.5"
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence = [measures]
    own = pydicom.Dataset()
    own.SliceThickness = "1.0"
    frame1, frame2 = pydicom.Dataset(), pydicom.Dataset()
    frame1.PixelMeasuresSequence = [own]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [frame1, frame2]
    d = router("Modality == 'CT' and SliceThickness <= 1.5", "SliceThickness > 2").decide(ds)
    assert [x.matched for x in d] == [True, False]
    del frame1.PixelMeasuresSequence
    assert [x.matched for x in router("SliceThickness == 2.5").decide(ds)] == [True]
