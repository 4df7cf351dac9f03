"""The run store and its file I/O: identities, strict JSON, atomic writes (umask, kills), locks, the layout doc."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitfl.core.io import FileFormatError, atomic_write_json, atomic_write_text, dumps_strict, read_json, to_jsonable
from vitfl.core.runstore import LAYOUT, ResultError, RunStore, identity_key, layout_markdown

REPO = Path(__file__).resolve().parents[1]


def test_identity_key_is_stable_and_sensitive():
    a = {"method": "ours", "options": {"p": 0.5, "two_sided": True}, "seed": 0}
    b = {"seed": 0, "options": {"two_sided": True, "p": 0.5}, "method": "ours"}  # same, other key order
    assert identity_key(a) == identity_key(b) and len(identity_key(a)) == 12
    assert identity_key(a) != identity_key({**a, "seed": 1})
    assert identity_key(a) != identity_key({**a, "options": {"p": 0.6, "two_sided": True}})
    assert identity_key({"t": (1, 2)}) == identity_key({"t": [1, 2]})


def test_strict_json_nan_as_null_and_reader_refuses_nan(tmp_path):
    obj = {"rr": float("nan"), "inf": float("inf"), "t": torch.tensor([1.5, float("nan")]), "v": torch.__version__,
           "n": __import__("numpy").float32(0.25), "p": Path("a/b")}
    text = dumps_strict(obj)
    parsed = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert parsed == {"rr": None, "inf": None, "t": [1.5, None], "v": str(torch.__version__), "n": 0.25, "p": "a/b"}
    p = tmp_path / "x.json"
    atomic_write_json(p, obj)
    assert read_json(p) == parsed
    p.write_text('{"rr": NaN}')
    with pytest.raises(FileFormatError, match=str(p)):
        read_json(p)
    p.write_text("{not json")
    with pytest.raises(FileFormatError, match="x.json"):
        read_json(p)
    assert to_jsonable(math.nan) is None


def test_atomic_write_respects_umask_and_refuses_a_folder(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "hello")
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)
    (tmp_path / "d.json").mkdir()
    with pytest.raises(FileFormatError, match="is a directory"):
        atomic_write_json(tmp_path / "d.json", {})
    with pytest.raises(FileFormatError, match="is a directory"):
        read_json(tmp_path / "d.json")


def test_a_kill_at_a_write_point_leaves_the_old_file(tmp_path):
    """VITFL_FAULT_AT=k kills the process at its k-th write point, after the temp file is complete and before the
    rename: the target keeps its previous content and no half file is visible."""
    target = tmp_path / "r.json"
    atomic_write_json(target, {"v": "old"})
    log = tmp_path / "writes.log"
    code = ("from vitfl.core.io import atomic_write_json as w\n"
            f"w({str(tmp_path / 'first.json')!r}, {{'v': 1}})\n"
            f"w({str(target)!r}, {{'v': 'new'}})\n")
    env = {**os.environ, "VITFL_FAULT_AT": "2", "VITFL_WRITE_LOG": str(log), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert out.returncode == -9  # SIGKILL
    assert read_json(target) == {"v": "old"} and read_json(tmp_path / "first.json") == {"v": 1}
    assert [line.split("\t")[1] for line in log.read_text().splitlines()] == [str(tmp_path / "first.json"),
                                                                               str(target)]
    env.pop("VITFL_FAULT_AT")
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
    assert read_json(target) == {"v": "new"}


def test_results_of_other_identities_coexist_and_bad_files_are_named(tmp_path):
    store = RunStore(tmp_path)
    ida = {"kind": "repair", "repair_options": {"generations": 50}, "rep": 0}
    idb = {**ida, "repair_options": {"generations": 100}}
    pa = store.repair_result_path(ida, setting="all", label="ours", budget=6, rep=0)
    pb = store.repair_result_path(idb, setting="all", label="ours", budget=6, rep=0)
    assert pa != pb and pa.parent == pb.parent == tmp_path / "repair" / "all"
    store.write_result(pa, ida, {"kind": "repair_result", "x": 1})
    assert store.read_result(pb, idb) is None
    store.write_result(pb, idb, {"kind": "repair_result", "x": 2})
    assert sorted(r["x"] for r in store.list_results("repair_result")) == [1, 2]
    assert store.read_result(pa, ida)["x"] == 1
    with pytest.raises(ResultError, match="another identity"):
        store.read_result(pa, idb)
    pa.write_text("{")
    with pytest.raises(ResultError, match=pa.name):
        store.read_result(pa, ida)
    pa.unlink()
    pa.mkdir()
    with pytest.raises(ResultError, match="is a directory"):
        store.read_result(pa, ida)
    with pytest.raises(ResultError, match="is a directory"):
        store.list_results("repair_result")


def test_fl_scores_round_trip_and_identity_check(tmp_path):
    store = RunStore(tmp_path)
    sid = {"kind": "fl_scores", "method": "ours", "setting": "all", "options": {}, "seed": 0, "inputs": {}}
    assert store.load_fl_scores(sid) is None
    s = torch.randn(100, dtype=torch.float64)
    store.save_fl_scores(sid, s, {"own": None, "wall_s": 0.5})
    back, meta = store.load_fl_scores(sid)
    assert torch.equal(back, s) and meta["wall_s"] == 0.5
    path = store.fl_scores_path(sid)
    assert path.suffix == ".safetensors" and path.parent == tmp_path / "fl" / "all"
    path.write_bytes(b"garbage")
    with pytest.raises(ResultError, match=path.name):
        store.load_fl_scores(sid)


def test_claim_is_exclusive_and_stale_locks_are_taken_over(tmp_path):
    store = RunStore(tmp_path)
    with store.claim("k1") as a:
        assert a
        with store.claim("k1") as b:
            assert not b
    with store.claim("k1") as c:
        assert c
    lock = store.path("lock", key="k2")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(f"{__import__('socket').gethostname()}:999999999")  # a dead process
    with store.claim("k2") as d:
        assert d


def test_layout_doc_is_generated_from_the_store():
    doc = (REPO / "docs" / "run_store.md").read_text()
    assert doc == layout_markdown()
    for kind, (template, _) in LAYOUT.items():
        assert f"`{template}`" in doc
