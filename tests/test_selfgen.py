"""selfgen.py (AlignCoT self-generation, METHOD.md sec. 1): the control flow of every safety-check
path with a scripted generator and checker, the probability verdict, records that data.read_chains
accepts, resume after an interruption, the summary, and one end-to-end run of `python data.py
generate` on a random tiny base."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import selfgen
from data import read_chains
from model import ModelArgs, Transformer
from selfgen import PROMPTS, align_cot, heldout, run, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# question -> P(safe) of its safety checks, in order (SAFE_THRESHOLD 0.5: 0.5 is safe)
SCRIPT = {
    "safe at once?": [0.9],
    "safe after analysis?": [0.2, 0.7],
    "needs guidance?": [0.1, 0.49, 0.5],
    "unsafe to the end?": [0.1, 0.2, 0.3],
}


def stage_of(prompt: str):
    """(stage, fields) of a prompt built from PROMPTS: the most specific template that matches."""
    for name, template in sorted(PROMPTS.items(), key=lambda kv: -len(kv[1])):
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.*)", re.escape(template))
        m = re.fullmatch(pattern, prompt, re.DOTALL)
        if m:
            return name, m.groupdict()
    raise AssertionError(f"not a stage prompt: {prompt!r}")


class Scripted:
    """A generate_fn (called) and a check_fn (.check): answers are "A<k>(question)" (k = the
    answer's stage), analyses and guidance are labelled text, and check k of a question gives
    P(safe) = SCRIPT[question][k]. Records every call of either, in order."""

    def __init__(self, fail_at_call=None):
        self.calls, self.fail_at_call = [], fail_at_call

    def __call__(self, prompts):
        if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
            raise RuntimeError("interrupted")
        staged = [stage_of(p) for p in prompts]
        self.calls.append([name for name, _ in staged])
        answers = {"response": 0, "response_with_analysis": 1, "response_with_guidance": 2}
        return [f"A{answers[name]}({f['question']})" if name in answers else f"  {name} of {f['question']}\n"
                for name, f in staged]

    def check(self, prompts):
        return self([p for p in prompts]) and [SCRIPT[f["question"]][int(f["response"][1])]
                                               for _, f in map(stage_of, prompts)]


def test_p_safe_and_verdict_tokens():
    from tokenizer import byte_tokenizer
    tok = byte_tokenizer()
    safe_ids, unsafe_ids = selfgen.verdict_tokens(tok)
    assert (safe_ids, unsafe_ids) == ([ord("S"), ord("s")], [ord("U"), ord("u")])  # " " starts both: left out
    probs = torch.zeros(2, 264)
    probs[0, ord("s")], probs[0, ord("u")] = 0.3, 0.1
    probs[1, ord("U")] = 0.2  # no mass on any "safe" token
    assert selfgen.p_safe(probs, [ord("s")], [ord("u"), ord("U")]) == pytest.approx([0.75, 0.0])


def test_every_path_of_the_safety_check():
    gen = Scripted()
    chains = {c["question"]: c for c in align_cot(list(SCRIPT), gen, gen.check)}
    assert chains["safe at once?"] == {"question": "safe at once?", "response": "A0(safe at once?)",
                                       "check": "safe", "path": "response"}
    c = chains["safe after analysis?"]
    assert c == {"question": "safe after analysis?", "analysis": "analysis of safe after analysis?",
                 "response": "A1(safe after analysis?)", "check": "unsafe,safe", "path": "analysis"}
    c = chains["needs guidance?"]
    assert (c["analysis"], c["guidance"]) == ("analysis of needs guidance?", "guidance of needs guidance?")
    assert (c["response"], c["check"], c["path"]) == ("A2(needs guidance?)", "unsafe,unsafe,safe", "guidance")
    c = chains["unsafe to the end?"]  # recorded as such: run() drops it
    assert (c["response"], c["check"], c["path"]) == ("A2(unsafe to the end?)", "unsafe,unsafe,unsafe", "guidance")
    # one batched call per stage, each with exactly the chains that reach it
    assert gen.calls == [["response"] * 4, ["check"] * 4, ["analysis"] * 3, ["response_with_analysis"] * 3,
                         ["check"] * 3, ["guidance"] * 2, ["response_with_guidance"] * 2, ["check"] * 2]


def test_later_stages_see_the_earlier_ones():
    seen = []

    def gen(prompts):
        seen.extend(prompts)
        return [f"<{stage_of(p)[0]}>" for p in prompts]

    align_cot(["Q?"], gen, lambda prompts: seen.extend(prompts) or [0.0] * len(prompts))
    final = stage_of(seen[-2])
    assert final == ("response_with_guidance", {"question": "Q?", "analysis": "<analysis>", "guidance": "<guidance>"})
    assert stage_of(seen[-1]) == ("check", {"question": "Q?", "response": "<response_with_guidance>"})


def test_records_pass_read_chains_and_summary_counts(tmp_path):
    out = str(tmp_path / "chains.jsonl")
    gen = Scripted()
    summary = run(list(SCRIPT), gen, gen.check, out, batch_size=3, progress=False)
    chains = read_chains(out)
    assert [c["question"] for c in chains] == list(SCRIPT)[:3]  # the one judged unsafe to the end is dropped
    assert summary == {"chains": 3, "with_response": 1.0, "with_analysis": 2 / 3, "with_guidance": 1 / 3,
                       "paths": {"response": 1, "analysis": 1, "guidance": 1}, "checks": 6,
                       "dropped_empty_response": 0, "dropped_unsafe_response": 1}
    assert summarize(chains) == summary | {"dropped_unsafe_response": 0}


def test_empty_final_answer_is_dropped(tmp_path):
    out = str(tmp_path / "chains.jsonl")
    summary = run(["Q?"], lambda ps: ["" for _ in ps], lambda ps: [1.0] * len(ps), out, progress=False)
    assert summary["chains"] == 0 and summary["dropped_empty_response"] == 1 and open(out).read() == ""


def test_resume_after_an_interruption(tmp_path):
    out = str(tmp_path / "chains.jsonl")
    questions = list(SCRIPT)[:3] + ["safe at once?"]  # a repeated question is generated once
    failing = Scripted(fail_at_call=9)
    with pytest.raises(RuntimeError, match="interrupted"):  # calls 0-1: question 1, 2-6: question 2, 7-: question 3
        run(questions, failing, failing.check, out, batch_size=1, progress=False)
    assert [c["question"] for c in read_chains(out)] == ["safe at once?", "safe after analysis?"]
    with open(out, "a") as f:
        f.write('{"question": "needs guid')  # a torn last line, as if killed while writing
    rerun = Scripted()
    summary = run(questions, rerun, rerun.check, out, batch_size=1, progress=False)
    assert [c["question"] for c in read_chains(out)] == list(SCRIPT)[:3]  # nothing twice, nothing lost
    assert summary["chains"] == 3 and len(rerun.calls) == 8  # only question 3, on the guidance path
    done = Scripted(fail_at_call=0)
    assert run(questions, done, done.check, out, progress=False)["chains"] == 3  # all done: no call


def test_question_files(tmp_path):
    questions = [f"question number {i}?" for i in range(40)]
    (tmp_path / "q.txt").write_text("\n".join(questions + questions[:3]) + "\n\n")
    assert selfgen.read_questions(str(tmp_path / "q.txt")) == questions
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    assert selfgen.read_questions(str(tmp_path / "q.jsonl")) == questions
    kept, n_heldout = selfgen.generation_questions(questions, limit=5)
    assert len(kept) == 5 and not any(heldout(q) for q in kept) and n_heldout == sum(map(heldout, questions)) > 0


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("selfgen")
    torch.manual_seed(0)
    Transformer(ModelArgs.preset("tiny")).save(str(d / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    return d


def test_end_to_end_on_a_tiny_model(tiny_base, tmp_path):
    questions = [q for q in (f"How do I do thing {i}?" for i in range(10)) if not heldout(q)][:3]
    held = next(q for q in (f"Held out {i}?" for i in range(50)) if heldout(q))
    (tmp_path / "q.txt").write_text("\n".join(questions + [held]) + "\n")
    out = tmp_path / "chains.jsonl"
    args = ["--base", str(tiny_base / "tiny.safetensors"), "--questions", str(tmp_path / "q.txt"), "--out", str(out),
            "--max-new-tokens", "8", "--batch-size", "3"]
    first = subprocess.run([sys.executable, "selfgen.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "questions: 4, held out for evaluation: 1" in first.stdout and "chains:" in first.stdout
    records = [json.loads(line) for line in open(out)]
    m = re.search(r"dropped this run: (\d+) judged unsafe after the guidance, (\d+) with an empty response", first.stdout)
    dropped = int(m.group(1)) + int(m.group(2))
    assert len(records) + dropped == 3 and held not in {r["question"] for r in records}
    if records:
        assert read_chains(str(out)) == records
        assert all(len(r["check"].split(",")) == selfgen.PATHS.index(r["path"]) + 1 for r in records)
    again = selfgen.main(args)  # a rerun generates only what is missing (here: the dropped, if any)
    assert [json.loads(line) for line in open(out)][: len(records)] == records
    assert again["chains"] + again["dropped_empty_response"] + again["dropped_unsafe_response"] == 3
