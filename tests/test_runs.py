"""The run directory contract (gemmalab.runs) and the file helpers under it (gemmalab.files)."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass

import pytest

from gemmalab.config import load
from gemmalab.errors import GemmalabError
from gemmalab.files import atomic_write, jsonl_lines, read_jsonl, write_json
from gemmalab.runs import RecordLog, RunDir, read_result


@dataclass
class Settings:
    steps: int = 3
    name: str = "a"


def test_run_directory_snapshot_result_and_metrics(tmp_path):
    run = RunDir(tmp_path / "run", "toy")
    assert not run.path.exists() and run.result() is None  # nothing is written until asked
    assert load(Settings, run.snapshot(Settings(7, "b"))) == Settings(7, "b")
    assert run.config_file.read_text().startswith("# Resolved toy config")
    with run.metrics(tensorboard=False) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": 1.0 / step})
    run.metrics_file.write_text(run.metrics_file.read_text() + '{"step": 4, "lo')  # a line cut by a kill
    run.trim_metrics(2)
    assert [json.loads(line)["step"] for line in run.metrics_file.read_text().splitlines()] == [1, 2]
    result = run.write_result("finished", {"score": 0.5})
    assert result == {"stage": "toy", "status": "finished", "score": 0.5} == read_result(run.path)
    run.result_file.write_text("{not json")
    with pytest.raises(GemmalabError, match=r"result\.json cannot be read"):
        run.result()


def test_record_log_resumes_and_drops_a_cut_last_line_once(tmp_path):
    path = tmp_path / "samples" / "task.jsonl"
    with RecordLog(path) as log:
        assert log.done == {}
        log.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    path.write_text(path.read_text() + '{"id": "c", "v"')  # killed while writing record c
    log = RecordLog(path)
    assert sorted(log.done) == ["a", "b"]
    assert path.read_text().endswith('"v": 2}\n')  # the cut line is gone, so appending starts on a fresh line
    log.append([{"id": "c", "v": 3}])
    log.close()
    assert [obj["id"] for _, obj in read_jsonl(path)] == ["a", "b", "c"]
    path.write_text('{"v": 1}\n')
    with pytest.raises(GemmalabError, match=r"task\.jsonl, line 1: expected a record with a 'id' field"):
        RecordLog(path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"a": 1})

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"a": Unserializable()})
    assert json.loads(path.read_text()) == {"a": 1} and not (tmp_path / "out.json.tmp").exists()
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_jsonl_lines_reports_every_bad_line_and_a_cut_file(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    raw = b'{"text": "a"}\n\n[1]\n{bad\n' + b'{"text": "\xff"}\n' + b'{"text": "b"}\n'
    path.write_bytes(gzip.compress(raw))
    got = list(jsonl_lines(path, blank_lines=True))
    assert [(n, problem.split(" (")[0] if problem else obj) for n, obj, problem in got] == [
        (1, {"text": "a"}), (2, "blank line"), (3, "expected a JSON object, got list"), (4, "not valid JSON"),
        (5, "not valid UTF-8"), (6, {"text": "b"})]
    path.write_bytes(gzip.compress(raw * 200)[:-40])  # a download cut short
    *_, (n, obj, problem) = jsonl_lines(path)
    assert obj is None and problem.startswith("file cannot be read to the end") and n > 1
    with pytest.raises(GemmalabError, match=r"docs\.jsonl\.gz, line 3: expected a JSON object, got list"):
        list(read_jsonl(path))
    # hostile lines: a 5,000-digit integer, nesting deeper than the parser goes; each counted, the rest still read
    hostile = tmp_path / "hostile.jsonl"
    hostile.write_text('{"n": ' + "9" * 5000 + '}\n' + '{"a": ' + "[" * 100_000 + "]" * 100_000 + '}\n{"text": "c"}\n')
    got = list(jsonl_lines(hostile))
    assert [obj for _, obj, _ in got] == [None, None, {"text": "c"}]
    assert got[0][2].startswith("not valid JSON here") and "nested too deeply" in got[1][2]


def test_atomic_dir_clears_what_a_killed_write_left_and_stamp_reads_the_model_files_only(tmp_path):
    from gemmalab.files import atomic_dir, stamp

    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    for stale in (".model.tmp-1", ".model.old-77"):  # another pid's leftovers (a container reuses pids)
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".model.old-77" / "x").write_text("")
    (tmp_path / ".modelx.tmp-1").mkdir()  # another folder's: kept
    with atomic_dir(dst) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert (dst / "config.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [".modelx.tmp-1", "model"]
    before = stamp(dst)
    (dst / "eval").mkdir()
    (dst / "eval" / "samples.jsonl").write_text("{}\n")  # an --out folder inside the model's: not the model
    (dst / "notes.txt").write_text("hi")
    assert stamp(dst) == before
    (dst / "model.safetensors").write_bytes(b"w")
    assert stamp(dst) != before
