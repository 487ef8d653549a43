"""A tuning database damaged the way a killed tuner or a bad copy leaves it (issue 22,
item 4): unreadable lines are skipped with a one-line warning, the rest still loads; compile
reads a cleaned copy and leaves the files alone, tune repairs them in place. The kill -9
runs themselves (minutes of tuning) are `benchmarks/tune_kill.py`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tvm_ffi

from abc_tvm import tuning
from abc_tvm.errors import UserError

SHIPPED = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "tuning_logs")
                 .glob(f"*/{tuning.RECORDS}"))
pytestmark = pytest.mark.skipif(not SHIPPED, reason="no shipped tuning database")


@pytest.fixture
def db(tmp_path) -> Path:
    out = tmp_path / "db"
    shutil.copytree(SHIPPED[0], out)
    return out


def keys(database) -> list[tuple[str, str]]:
    """Each record as (its workload's structural hash, its trace): what identifies it."""
    return [(str(tvm_ffi.structural_hash(r.workload.mod)), str(r.trace.as_json())) for r in
            database.get_all_tuning_records()]


def test_cut_off_last_record_is_skipped_with_a_warning(db, capsys):
    rpath = db / tuning.RECORDS
    whole = rpath.read_bytes()
    n = len(whole.splitlines())
    rpath.write_bytes(whole[:-57])  # the tuner killed in the middle of its last write
    cut = rpath.read_bytes()
    assert len(tuning.open_database(db, repair=False)) == n - 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 1 record line(s)" in err[0] and f"line {n}" in err[0]
    assert rpath.read_bytes() == cut  # compile's view: a cleaned copy, the file untouched
    assert len(tuning.open_database(db)) == n - 1  # tune's: repaired in place
    assert "skipped 1 record line(s)" in capsys.readouterr().err
    assert rpath.read_bytes() == b"\n".join(whole.splitlines()[:-1]) + b"\n"
    assert (db / f"{tuning.RECORDS}.skipped").read_bytes() == cut.splitlines()[-1] + b"\n"
    assert len(tuning.open_database(db)) == n - 1 and not capsys.readouterr().err


def test_garbage_lines_and_a_broken_workload_drop_only_what_they_touch(db, capsys):
    full = tuning.open_database(db, repair=False)
    before = keys(full)
    rpath, wpath = db / tuning.RECORDS, db / tuning.WORKLOADS
    lines = rpath.read_text().splitlines()
    lines.insert(5, "\x00\x00 not json")
    lines.insert(9, '{"a": 1}')
    rpath.write_text("\n".join(lines) + "\n")
    got = tuning.open_database(db, repair=False)
    assert keys(got) == before
    assert "skipped 2 record line(s)" in capsys.readouterr().err
    # A workload line corrupted: its records go, the later ones are renumbered and stay.
    wlines = wpath.read_text().splitlines()
    victim = 1
    hashes = [ln.split('"')[1] for ln in wlines]
    wlines[victim] = wlines[victim][: len(wlines[victim]) // 2]
    wpath.write_text("\n".join(wlines) + "\n")
    got = tuning.open_database(db)
    want = [k for k in before if k[0] != hashes[victim]]
    assert keys(got) == want and len(want) < len(before)
    assert "workload line(s)" in capsys.readouterr().err


def test_valid_json_tvm_cannot_parse_is_one_line(db):
    (db / tuning.RECORDS).write_text((db / tuning.RECORDS).read_text() + '[0, "junk"]\n')
    with pytest.raises(UserError, match="cannot be read") as info:
        tuning.open_database(db)
    assert "\n" not in str(info.value)


def test_a_last_line_without_newline_is_ended_before_the_next_append(db):
    rpath = db / tuning.RECORDS
    rpath.write_text(rpath.read_text().rstrip("\n"))
    n = len(tuning.open_database(db, repair=False))
    assert not rpath.read_text().endswith("\n")
    assert len(tuning.open_database(db)) == n and rpath.read_text().endswith("\n")
