"""A run folder carries its own settings: sample.py finds the latest finished run, and the path rule
stored in a run folder (calibrate.py --save) is used unless a typed flag or --argmax overrides it."""
import argparse
import json
import os
import time

import pytest

import sample


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--adapters")
    sample.rule_flags(p)
    p.error = lambda message: (_ for _ in ()).throw(SystemExit(f"error: {message}"))
    return p


def rule(*argv):
    p = parser()
    return sample.resolve_rule(p, p.parse_args(list(argv)))


def test_the_stored_rule_is_used_unless_overridden(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert rule("--adapters", str(run)) == {"steps_threshold": None, "second_choice": False}  # none stored: argmax
    (run / sample.RULE_FILE).write_text(json.dumps({"steps_threshold": 0.3, "second_choice": True}))
    assert rule("--adapters", str(run)) == {"steps_threshold": 0.3, "second_choice": True}
    assert "path_rule.json: --steps-threshold 0.3 --second-choice (--argmax for none)" in capsys.readouterr().err
    assert rule("--adapters", str(run), "--argmax") == {"steps_threshold": None, "second_choice": False}
    assert rule("--adapters", str(run), "--steps-threshold", "0.5") == {"steps_threshold": 0.5, "second_choice": False}
    (run / sample.RULE_FILE).write_text("{}")
    with pytest.raises(SystemExit, match=r"path_rule.json: not a path rule written by calibrate.py"):
        rule("--adapters", str(run))


def test_sample_finds_the_most_recent_finished_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: runs/: holds no finished run"):
        sample.latest_run()
    for name, age in (("old", 100), ("new", 0), ("unfinished", None)):
        os.makedirs(f"runs/{name}")
        if age is not None:
            open(f"runs/{name}/adapters.safetensors", "w").close()
            os.utime(f"runs/{name}/adapters.safetensors", (time.time() - age, time.time() - age))
    assert sample.latest_run() == os.path.join("runs", "new")
