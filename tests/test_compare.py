"""compare.py: the paired difference of two evaluations on the same prompts (oracle values by hand)."""
import json

import pytest

import compare
import evaluate
import experiment


def write(folder, verdicts: dict):
    """An evaluate.py folder whose completions.jsonl holds, per set, one record per verdict:
    True = right (harmful refused, benign answered)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "completions.jsonl", "w") as f:
        for name, rights in verdicts.items():
            label = compare.evaluate.SETS[name]
            for i, ok in enumerate(rights):
                refused = ok if label == "harmful" else not ok
                f.write(json.dumps({"set": name, "label": label, "prompt": f"{name} {i}", "refusal": refused,
                                    "empty_response": False}) + "\n")
    return str(folder)


A = {"strongreject": [1, 1, 1, 0], "benign": [1, 1, 1, 0, 1]}
B = {"strongreject": [1, 0, 0, 0], "benign": [1, 0, 1, 0, 1]}


def test_one_pair_by_hand(tmp_path):
    r = compare.paired([(compare.read(write(tmp_path / "a", A)), compare.read(write(tmp_path / "b", B)))])
    s = r["strongreject"]  # d = 0, 1, 1, 0: mean 1/2, sample variance 1/3
    assert (s["n"], s["a"], s["b"], s["only_a"], s["only_b"]) == (4, 3, 1, 2, 0)
    assert s["difference"] == 0.5 and s["half"] == pytest.approx(1.96 * (1 / 3 / 4) ** 0.5)
    b = r["benign"]  # d = 0, 1, 0, 0, 0: mean 1/5, sample variance 0.8 / 4
    assert (b["only_a"], b["only_b"]) == (1, 0) and b["difference"] == pytest.approx(0.2)
    assert b["half"] == pytest.approx(1.96 * (0.2 / 5) ** 0.5)
    assert r["combined"]["difference"] == pytest.approx(0.35)
    assert r["combined"]["half"] == pytest.approx((s["half"] ** 2 + b["half"] ** 2) ** 0.5 / 2)


def test_a_repeated_pair_of_runs_is_not_new_evidence(tmp_path):
    """Seeds are averaged per prompt before the interval: the same pair twice gives the same
    difference and interval (twice the counts). Counting 2n prompts as independent would narrow it."""
    pair = (compare.read(write(tmp_path / "a", A)), compare.read(write(tmp_path / "b", B)))
    once, twice = compare.paired([pair]), compare.paired([pair, pair])
    for name in ("strongreject", "benign", "combined"):
        assert twice[name]["difference"] == once[name]["difference"]
        assert twice[name]["half"] == pytest.approx(once[name]["half"])
    assert twice["strongreject"]["only_a"] == 4 and twice["strongreject"]["a"] == 6


def test_repeated_prompts_stay_separate_and_other_prompts_are_an_error(tmp_path):
    same = {"strongreject": [1, 0]}
    a, b = (compare.read(write(tmp_path / n, same)) for n in "ab")
    a["strongreject"] = {("q", 0): True, ("q", 1): False}  # one prompt asked twice
    b["strongreject"] = {("q", 0): False, ("q", 1): False}
    assert compare.paired([(a, b)])["strongreject"]["n"] == 2
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "completions.jsonl").write_text(
        "".join(json.dumps({"set": "strongreject", "label": "harmful", "prompt": "q", "refusal": True,
                            "empty_response": False}) + "\n" for _ in range(2)))
    assert len(compare.read(str(tmp_path / "r"))["strongreject"]) == 2
    other = compare.read(write(tmp_path / "c", {"strongreject": [1, 0, 0]}))
    with pytest.raises(ValueError, match="same prompts"):
        compare.paired([(compare.read(write(tmp_path / "d", same)), other)])


def test_command_line(tmp_path, capsys):
    a, b = write(tmp_path / "a", A), write(tmp_path / "b", B)
    compare.main(["--pair", a, b, "--names", "MoTE", "single"])
    out = capsys.readouterr().out
    assert "strongreject  refused  MoTE 3/4, single 1/4; only MoTE 2, only single 0; difference +0.500 [-0.066, +1.066]" in out
    assert "combined (strongreject refused + benign answered) / 2: difference +0.350" in out
    with pytest.raises(SystemExit, match="nope: no completions.jsonl"):
        compare.main(["--pair", a, str(tmp_path / "nope")])
    bad = write(tmp_path / "bad", A)
    with open(f"{bad}/completions.jsonl", "a") as f:
        f.write('{"set": "benign"}\n')
    with pytest.raises(SystemExit, match=r"bad/completions.jsonl:10: not an evaluate.py record \(KeyError"):
        compare.main(["--pair", a, bad])
    c = write(tmp_path / "c", {"hh": [1]})
    with pytest.raises(SystemExit, match="no prompt set in common"):
        compare.main(["--pair", a, c])


def test_experiment_compares_each_variant_with_the_single_lora_on_the_same_path_pooling_seeds(tmp_path, capsys):
    """Each variant against the single LoRA of the same seed on the same path, read from
    completions.jsonl, the seeds pooled per prompt (compare.paired)."""
    sets = {n: [1, 1, 0, 1] for n in experiment.SETS}
    rows = [("-", "base alone", "-", write(tmp_path / "base", sets), None)]
    for seed in ("seed 0", "seed 1"):
        for name, right in (("MoTE", 1), ("single LoRA", 0)):
            for path in ("auto", "full") if name == "MoTE" else ("auto",):
                verdicts = {n: [1, 1, 0, right] for n in experiment.SETS}
                out = write(tmp_path / seed / name / f"eval-{path}", verdicts)
                rows.append((seed, name, path, out, str(tmp_path / seed / name)))
    experiment.print_against_single(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("| MoTE | auto | 2 | only 2 / 0, +0.25 [")  # full has no single LoRA row to pair
    assert lines[-1].endswith("| +0.25 [-0.10, +0.60] |")  # combined: (1/4 + 1/4) / 2 +- sqrt(2) * 0.49 / 2
    assert evaluate.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert evaluate.wilson(313, 313) == pytest.approx((0.9879, 1.0), abs=1e-4)

