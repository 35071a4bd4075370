"""results/reference/: every committed reference run loads, says how it was made and on what machine,
and its records have the fields the notebooks read (ppu_lab.reference.FIELDS)."""

from __future__ import annotations

import pytest

from ppu_lab import reference
from ppu_lab.mpiexec import usable_cores

FILES = sorted(reference.REFERENCE_DIR.glob("*.json"))


def test_every_reference_that_a_notebook_reads_is_committed():
    assert {p.stem for p in FILES} >= set(reference.FIELDS), "a name in FIELDS has no file in results/reference"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_reference_loads_with_its_machine_and_fields(path):
    doc = reference.load(path.stem)
    assert doc["name"] == path.stem and doc["command"] and doc["recorded"]
    assert doc["machine"].get("cores_usable") and doc["machine"].get("python")
    assert doc["records"], "a reference run without records"
    for field in reference.FIELDS.get(path.stem, ()):
        missing = [i for i, r in enumerate(doc["records"]) if field not in r]
        assert not missing, f"records {missing[:5]} of {path.name} lack {field!r}, which a notebook reads"


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "REFERENCE_DIR", tmp_path / "reference")
    records = [{"ranks": 1, "seconds": 0.5}, {"ranks": 2, "seconds": float("nan")}]
    target = reference.save("demo", records, command="python demo.py", notes="a test")
    doc = reference.load("demo")
    assert target == tmp_path / "reference" / "demo.json"
    assert doc["records"][0] == records[0] and doc["records"][1]["seconds"] != doc["records"][1]["seconds"]
    assert doc["machine"]["cores_usable"] == usable_cores() and doc["command"] == "python demo.py"
    assert "python demo.py" in reference.describe("demo")
    with pytest.raises(FileNotFoundError, match="there are: \\['demo'\\]"):
        reference.load("nothing")
