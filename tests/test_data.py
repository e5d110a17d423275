"""data.py chains: validation errors name file and line, encoding layout and label masks, batching,
the HH-RLHF question loader, and the committed chain sets."""
import gzip
import json
import os

import pytest
import torch

import mote
from tokenizer import byte_tokenizer, hf_tokenizer
from data import DataError, collate, encode_chain, encode_chains, hh_questions, read_chains
from evaluate import is_refusal

V = 264
TOK = byte_tokenizer().with_special_tokens(mote.marker_tokens(V))
DEMO = os.path.join(os.path.dirname(__file__), "..", "data", "demo_chains.jsonl")
HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")


def write(tmp_path, *lines):
    path = tmp_path / "chains.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


GOOD = json.dumps({"question": "q?", "response": "a."})


@pytest.mark.parametrize("line,message", [
    ('{"question": "q", "response": ', "invalid JSON"),
    ('["question", "response"]', "expected a JSON object, got list"),
    ('{"question": "q"}', "missing or empty 'response'"),
    ('{"question": "q", "response": "   "}', "missing or empty 'response'"),
    ('{"question": "", "response": "a"}', "missing or empty 'question'"),
    ('{"question": "q", "response": "a", "reasoning": "r"}', r"unknown keys \['reasoning'\]"),
    ('{"question": "q", "response": "a", "analysis": 3}', "field 'analysis' must be a string, got int"),
    ('{"question": "q", "response": ["a"]}', "field 'response' must be a string, got list"),
    ('{"question": "q", "response": "a", "path": "shortcut"}', "'path' must be one of"),
    ('{"question": "q", "response": "a", "check": "unsafe,maybe"}', "'check' must be verdicts"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, GOOD, "", line)  # line 3 (the blank line 2 is skipped)
    with pytest.raises(DataError, match=f"chains.jsonl:3: {message}"):
        read_chains(path)


def test_empty_and_unreadable_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no chains"):
        read_chains(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="nope.jsonl: cannot read"):
        read_chains(str(tmp_path / "nope.jsonl"))


def test_train_py_reports_bad_data_in_one_line(tmp_path):
    import subprocess
    import sys
    path = write(tmp_path, GOOD, '{"question": "q"}')
    run = subprocess.run([sys.executable, "train.py", "--base", "x", "--data", path, "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"error: {path}:2: missing or empty 'response'"


def test_chain_encoding_layout_and_labels():
    chain = {"question": "Hi?", "analysis": "risk", "response": "ok", "check": "safe"}
    tokens, targets, conclusion, harmful = encode_chain(TOK, chain, V)
    prompt = TOK.chat("Hi?")
    A, A_, R, R_ = V, V + 1, V + 4, V + 5
    assert tokens == prompt + [A, *TOK.encode("risk"), A_, R, *TOK.encode("ok"), R_, TOK.eot_id]
    learned = [t for t, y in enumerate(targets) if y != -100]
    assert learned == list(range(len(prompt) - 1, len(tokens) - 1))  # from the first marker to the eot
    assert all(targets[t] == tokens[t + 1] for t in learned)
    steps = mote.token_steps(torch.tensor([tokens]), V)[0].tolist()
    assert steps == [mote.QUESTION] * len(prompt) + [0] * 6 + [2] * 5
    assert TOK.decode(tokens[len(prompt):]) == "<|analysis|>risk<|/analysis|><|response|>ok<|/response|><|eot|>"
    assert [tokens[t + 1] for t, c in enumerate(conclusion) if c] == TOK.encode("risk")  # one sentence: all of it
    assert not any(harmful)  # no verdict: not an analysis that concludes harmful


@pytest.mark.parametrize("analysis,sentence", [
    ("It names a weed. Verdict: harmless.", "Verdict: harmless."),
    ("Is it a weapon?  No: a garden tool!\nVerdict: harmless.", "Verdict: harmless."),
    ("Poisoning a person. Verdict: harmful.", "Verdict: harmful."),
])
def test_the_conclusion_is_the_analysis_last_sentence(analysis, sentence):
    chain = {"question": "q", "analysis": analysis, "guidance": "Answer. Verdict: no.", "response": "ok."}
    tokens, targets, conclusion, harmful = encode_chain(TOK, chain, V)
    marked = [t for t, c in enumerate(conclusion) if c]
    assert TOK.decode([targets[t] for t in marked]) == sentence  # and the token after it is </a>
    assert marked == list(range(marked[0], marked[-1] + 1)) and targets[marked[-1] + 1] == V + 1
    analysis_text = [targets[t] for t, h in enumerate(harmful) if h]  # the whole text, no marker, or nothing
    assert analysis_text == (TOK.encode(analysis.strip()) if sentence == "Verdict: harmful." else [])


def test_the_recipe_chains_mark_their_verdict_with_a_real_tokenizer():
    """Every analysis of the recipe's chains has its "Verdict: ..." sentence marked with a byte-level
    BPE (the fixture), where the sentence must be found as a suffix of merged tokens."""
    bpe = hf_tokenizer(os.path.join(os.path.dirname(__file__), "fixtures", "tiny_tokenizer.json"))
    tok = bpe.with_special_tokens(mote.marker_tokens(bpe.n_vocab))
    for c in (c for c in read_chains(DEMO) if c.get("analysis")):
        tokens, targets, conclusion, _ = encode_chain(tok, c, bpe.n_vocab)
        assert tok.decode([targets[t] for t, f in enumerate(conclusion) if f]).strip() == \
            c["analysis"][c["analysis"].rindex("Verdict:"):].strip()


def test_long_chains_are_dropped_and_counted():
    chains = [{"question": "q", "response": "a" * n} for n in (5, 500, 10)]
    kept, dropped = encode_chains(TOK, chains, V, max_len=100)
    assert dropped == 1 and [len(t) for t, *_ in kept] == [len(encode_chain(TOK, chains[0], V)[0]),
                                                          len(encode_chain(TOK, chains[2], V)[0])]


def test_collate_pads_on_the_right():
    a, b = encode_chain(TOK, {"question": "q", "response": "a"}, V), encode_chain(TOK, {"question": "q", "response": "abc"}, V)
    tokens, targets, valid, conclusion, harmful = collate([a, b], pad_id=TOK.eot_id)
    assert tokens.shape == (2, len(b[0])) and valid.sum(1).tolist() == [len(a[0]), len(b[0])]
    assert (targets[0, len(a[0]):] == -100).all() and tokens[0, :len(a[0])].tolist() == a[0]
    assert conclusion.shape == harmful.shape == (2, len(b[0])) and not (conclusion | harmful).any()  # no analysis


def test_hh_questions_first_human_turn_deduplicated(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    dialogues = ["\n\nHuman: How do I bake bread?\n\nAssistant: Flour.\n\nHuman: And?\n\nAssistant: Water.",
                 "\n\nHuman: How do I bake bread?\n\nAssistant: Yeast.", "\n\nHuman: Is it late?\n\nAssistant: Yes."]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"chosen": d, "rejected": d}) + "\n" for d in dialogues)
    assert hh_questions(str(path)) == ["How do I bake bread?", "Is it late?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y"}\n{"text": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not an HH-RLHF record"):
        hh_questions(str(bad))


@pytest.mark.skipif(not os.path.exists(HH), reason="HH-RLHF not beside the checkout (../shared/data/hh-rlhf)")
def test_hh_questions_on_the_real_file():
    questions = hh_questions(HH)
    assert 2000 < len(questions) <= 2312 and len(set(questions)) == len(questions)
    assert all(q and "Human:" not in q and "Assistant:" not in q for q in questions)


def test_demo_set_is_valid_and_mixed():
    chains = read_chains(DEMO)
    full = [c for c in chains if "analysis" in c and "guidance" in c]
    analysis_only = [c for c in chains if "analysis" in c and "guidance" not in c]
    direct = [c for c in chains if "analysis" not in c and "guidance" not in c]
    assert len(chains) >= 150 and len(full) >= 75 and len(analysis_only) >= 20 and len(direct) >= 30
    assert len({c["question"] for c in chains}) == len(chains)


VARIETY = os.path.join(os.path.dirname(DEMO), "variety_chains.jsonl")
SOURCES = {DEMO: {"demo", "extra", "w1", "w2", "w3", "w4", "w5"}, VARIETY: {"w6", "w7", "w8", "w9"}}


@pytest.mark.parametrize("path", [DEMO, VARIETY], ids=["recipe", "variety"])
def test_the_verdict_is_in_the_words_not_in_the_path(path):
    """The recipe's chains, and the variety lever's (README: the data): every analysis ends with its
    verdict, "Verdict: harmful." or "Verdict: harmless."; a benign chain's guidance says what to
    answer ("Answer..."), a harmful one's does not; both verdicts are on every path (direct, analysis,
    analysis + guidance), so taking a step says nothing of the verdict; and an English response
    refuses iff its verdict is harmful, but for a few soft declines ("Please don't...") that the
    phrase judge does not count."""
    chains = read_chains(path)
    label = {c["question"]: c["analysis"].rsplit("Verdict: ", 1)[-1] for c in chains if "analysis" in c}
    assert all(c["analysis"].endswith(("Verdict: harmful.", "Verdict: harmless.")) for c in chains if "analysis" in c)
    assert all(c["guidance"].startswith("Answer") == (label[c["question"]] == "harmless.") for c in chains if "guidance" in c)
    for steps in ({"response"}, {"analysis", "response"}, {"analysis", "guidance", "response"}):
        on_path = [c for c in chains if set(c) & {"analysis", "guidance", "response"} == steps]
        refused = sum(is_refusal(c["response"]) for c in on_path)
        assert 0.25 * len(on_path) < refused < 0.75 * len(on_path), (steps, refused, len(on_path))
    disagree = [c for c in chains if c["question"] in label and is_refusal(c["response"]) != (label[c["question"]] == "harmful.")]
    assert len(disagree) <= 20 and all(label[c["question"]] == "harmful." for c in disagree)
    assert len({c["question"] for c in chains}) == len(chains) and {c["source"] for c in chains} == SOURCES[path]


def test_the_variety_chains_are_new_questions():
    """No question of the variety lever's file is in the recipe's, verbatim or by case and punctuation."""
    norm = lambda q: "".join(ch for ch in q.lower() if ch.isalnum())
    assert not {norm(c["question"]) for c in read_chains(VARIETY)} & {norm(c["question"]) for c in read_chains(DEMO)}


def test_a_chain_file_of_the_older_format_is_read_with_a_note(tmp_path, capsys):
    path = write(tmp_path, json.dumps({"question": "q?", "answer": "a.", "path": "answer"}))
    assert read_chains(path) == [{"question": "q?", "response": "a.", "path": "response"}]
    assert capsys.readouterr().err == f"note: {path}: read the older key 'answer' as 'response'\n"




def test_no_two_top_level_files_import_each_other():
    import ast
    import glob
    root = os.path.join(os.path.dirname(__file__), "..")
    local = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "*.py"))}
    imports = {}
    for name in local:
        tree = ast.parse(open(os.path.join(root, name + ".py")).read())
        imports[name] = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                        {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imports[name] &= local
    circles = {tuple(sorted((a, b))) for a in imports for b in imports[a] if a in imports.get(b, ())}
    assert not circles, circles
