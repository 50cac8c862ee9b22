"""One naming scheme: every JSON output validates against the schema shipped in npqfile/schemas."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import require

from npqfile.cli import main
from npqfile.schemas import NAME_PATTERN, SCHEMAS, schema, validate

# maps keyed by data, not by names: block names (hashes), device field names (fields)
DATA_KEYED = {"hashes", "fields"}


def _names(doc, path="") -> list[str]:
    """Every key of ``doc`` (recursively) that is not lowercase-hyphenated, with its path."""
    bad = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if not re.fullmatch(NAME_PATTERN, k):
                bad.append(f"{path}/{k}")
            if k not in DATA_KEYED:
                bad += _names(v, f"{path}/{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            bad += _names(v, f"{path}/{i}")
    return bad


def check(doc, name: str) -> None:
    require(importlib.util.find_spec("jsonschema") is not None, "jsonschema (pip install 'npqfile[test]')")
    validate(doc, name)
    assert _names(doc) == []


def _json(capsys, argv, expect_rc=None):
    rc = main(argv)
    if expect_rc is not None:
        assert rc == expect_rc
    return json.loads(capsys.readouterr().out)


def test_every_schema_is_a_valid_draft_2020_12_schema():
    require(importlib.util.find_spec("jsonschema") is not None, "jsonschema")
    import jsonschema

    for name in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema(name))
    with pytest.raises(ValueError, match="no JSON schema"):
        schema("nope")


def test_migrate_outputs_follow_the_schema(tmp_path, capsys):
    base = ["migrate", "--json", "--quiet", "--size", "2M"]
    check(_json(capsys, [*base, "--workload", "uniform:rate=2000", "--xbzrle-cache", "1M", "--compress", "zlib"], 0),
          "migrate")
    check(_json(capsys, [*base, "--workload", "uniform:rate=8000", "--max-bandwidth", "8MB/s", "--downtime-limit",
                         "10", "--max-iterations", "2", "--auto-converge"], 2), "migrate")
    failed = _json(capsys, [*base, "--workload", "idle", "--to", "exec:false"], 1)
    assert failed["status"] == "failed"
    check(failed, "migrate")
    check(_json(capsys, [*base, "--workload", "idle", "--to", f"file:{tmp_path / 's.bin'}"], 0), "migrate")
    events = tmp_path / "ev.jsonl"
    assert main([*base, "--workload", "idle", "--events", str(events)]) == 0
    capsys.readouterr()
    for line in events.read_text().splitlines():
        check(json.loads(line), "events")


def test_incoming_analyze_reclaim_and_sweep_outputs_follow_the_schema(tmp_path, capsys):
    snap = tmp_path / "s.bin"
    assert main(["migrate", "--quiet", "--size", "2M", "--workload", "idle", "--to", f"file:{snap}"]) == 0
    capsys.readouterr()
    doc = _json(capsys, ["incoming", f"file:{snap}", "--ram", "2M", "--json"], 0)
    assert doc["ram"]["normal"] + doc["ram"]["duplicate"] == 512          # QEMU's names, not normal_pages
    check(doc, "incoming")
    check(_json(capsys, ["incoming", f"file:{snap}", "--ram", "4M", "--json"], 1), "incoming")
    doc = _json(capsys, ["analyze", str(snap), "--json", "--fields"], 0)
    assert "section-id" in doc["sections"][0] and "target-page-bits" in doc
    check(doc, "analyze")
    doc = _json(capsys, ["reclaim", "--size", "1M", "--json"], 0)
    assert "host-page-size" in doc and "rss-before" in doc["results"][0]
    check(doc, "reclaim")
    rows = _json(capsys, ["migrate", "--json", "--quiet", "--size", "1M", "--workload", "idle", "--jobs", "2",
                          "--sweep", "workload=idle,bogus", "--sweep", "downtime=100"], 1)
    assert [r["status"] for r in rows] == ["completed", "failed"] and rows[0]["downtime-limit"] == "100"
    check(rows, "sweep")


def test_a_wrong_name_is_caught():
    require(importlib.util.find_spec("jsonschema") is not None, "jsonschema")
    import jsonschema

    doc = {"status": "completed", "error": None, "machine": "none", "load-time": 0, "hash-time": 0, "hashes": {},
           "bytes": 0, "ram": {}, "warnings": []}
    validate(doc, "incoming")
    with pytest.raises(jsonschema.ValidationError):
        validate({**doc, "ram": {"normal_pages": 1}}, "incoming")
    assert _names({"ram": {"normal_pages": 1}, "hashes": {"pc.ram": "x"}}) == ["/ram/normal_pages"]
