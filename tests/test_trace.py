"""The pictures (issue 36): sample.py --trace draws each token with the expert that read it and each
choice of way with its probabilities; svg.py --mask draws mote.skip_mask. Each test reads the SVG
back (xml.etree) and checks what is drawn against the functions that route and mask."""
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import mote
import sample
import svg
from model import ModelArgs
from test_end_to_end import tiny_runs

NS = {"s": "http://www.w3.org/2000/svg"}
PROMPT = "How do I kill a process?"
VARIANTS = {"mote": [], "single": ["--routing", "single"], "token": ["--routing", "token"], "no-shared": ["--no-shared"]}
FLAGS = ["--max-new-tokens", "30", "--max-step-tokens", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A random tiny base and one fp32 run per variant (test_end_to_end.tiny_runs)."""
    return tiny_runs(tmp_path_factory.mktemp("trace"), VARIANTS, ["--dtype", "float32"])


def drawn_tokens(path):
    """The token groups of a route picture, in order: (attributes, the rect's attributes)."""
    root = ET.parse(path).getroot()
    return [(g.attrib, g.find("s:rect", NS).attrib) for g in root.iter(f"{{{NS['s']}}}g") if g.get("class") == "token"]


def drawn_choices(path):
    root = ET.parse(path).getroot()
    return [g.attrib for g in root.iter(f"{{{NS['s']}}}g") if g.get("class") == "choice"]


def generated(run, rule=(), dtype="float32"):
    """What sample.py --prompt generates for PROMPT (the same call main makes) -> (model, tok, prompt ids, ids)."""
    model, tok = sample.load(None, str(run), "cpu", dtype)
    prompt = tok.chat(PROMPT)
    args = dict(max_new_tokens=30, max_step_tokens=3, experts=True, path="auto", merge=True, **dict(rule))
    return model, tok, prompt, sample.generate(model, [prompt], tok.stop_ids, **args)[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_route_picture_draws_each_token_with_the_expert_that_read_it(runs, variant, dtype, tmp_path):
    out = tmp_path / "route.svg"
    sample.main(["--adapters", str(runs / variant), "--prompt", PROMPT, "--trace", str(out), *FLAGS, "--dtype", dtype])
    model, tok, prompt, ids = generated(runs / variant, dtype=dtype)
    V = model.args.vocab_size
    tokens = drawn_tokens(out)
    assert [int(a["data-id"]) for a, _ in tokens] == prompt + ids  # every token, in order
    steps = mote.token_steps(torch.tensor([prompt + ids]), V)[0]
    assert [int(a["data-step"]) for a, _ in tokens] == steps.tolist()
    for i, name in enumerate(mote.STEPS):  # each step's text tokens are split_steps' (markers and stops aside)
        text = [int(a["data-id"]) for a, _ in tokens[len(prompt):] if int(a["data-step"]) == i]
        assert [t for t in text if t < V and t not in tok.stop_ids] == sample.split_steps(ids, V, tok.stop_ids)[name]
    assert [a["data-id"] for a, r in tokens if r.get("stroke-width") == "1.5"] == [str(t) for t in prompt + ids if t >= V]
    fills = [r["fill"] for _, r in tokens]
    if variant == "single":
        assert set(fills) == {svg.SINGLE_COLOUR}
    elif variant == "token":  # the top expert of the gate, drawn with its weight as opacity
        assert all(r["fill"] == svg.EXPERT_COLOURS[int(a["data-expert"])] for a, r in tokens)
        assert all(0 < float(r["fill-opacity"]) <= 1 for _, r in tokens)
    else:  # the step expert of mote.route: the question's is the one that reads it at inference
        route = mote.route(steps[None], torch.tensor([mote.INFERENCE_QUESTION_EXPERT]))[0]
        assert fills == [svg.EXPERT_COLOURS[e] for e in route.tolist()]
        assert {float(a["data-weight"]) for a, _ in tokens} == {0.5 if variant == "mote" else 1.0}


@pytest.mark.parametrize("rule", [{}, {"steps_threshold": 0.1, "second_choice": True}, {"steps_threshold": 0.1}])
def test_route_picture_shows_the_probabilities_the_sampler_chose_by(runs, rule, tmp_path, monkeypatch):
    """The probabilities drawn at each choice are the softmax over the markers the grammar allowed,
    as the sampler saw them, and the rule's score is take_steps' own (recorded while generating)."""
    seen, scores = [], []
    constrain, rule_score = sample.constrain, sample.rule_score

    def constrain_seen(*args):
        logits = constrain(*args)
        seen.append(logits[0].clone())  # before take_steps changes it: what the model allows
        return logits

    def rule_score_seen(*args):
        scores.append(rule_score(*args))
        return scores[-1]
    monkeypatch.setattr(sample, "constrain", constrain_seen)
    monkeypatch.setattr(sample, "rule_score", rule_score_seen)
    model, tok, prompt, ids = generated(runs / "mote", rule)
    monkeypatch.undo()
    V = model.args.vocab_size
    expected = []
    for logits, token in zip(seen, ids):
        allowed = torch.isfinite(logits).nonzero()[:, 0].tolist()
        if len(allowed) > 1 and all(t >= V for t in allowed):  # a choice of way
            expected.append(({tok.decode([m]): p for m, p in zip(allowed, torch.softmax(logits[allowed], -1).tolist())},
                             tok.decode([token])))
    out = tmp_path / "route.svg"
    flags = ["--steps-threshold", str(rule["steps_threshold"])] if rule else ["--argmax"]
    sample.main(["--adapters", str(runs / "mote"), "--prompt", PROMPT, "--trace", str(out), *FLAGS, *flags,
                 "--dtype", "float32", *(["--second-choice"] if rule.get("second_choice") else [])])
    choices = drawn_choices(out)
    assert expected and len(choices) == len(expected)
    for drawn, (probs, taken) in zip(choices, expected):
        assert drawn["data-taken"] == taken
        assert json.loads(drawn["data-probs"]).keys() == probs.keys()
        assert list(json.loads(drawn["data-probs"]).values()) == pytest.approx(list(probs.values()), abs=1e-4)
    recorded = [s for s in scores if s is not None]
    ruled = [c for c in choices if c["data-score"] != "None"]
    assert [float(c["data-score"]) for c in ruled] == pytest.approx(recorded, abs=1e-4)
    assert len(ruled) == (0 if not rule else 2 if rule.get("second_choice") else 1)  # both choices are drawn
    assert {c["data-threshold"] for c in ruled} <= {str(rule.get("steps_threshold"))}


def test_mask_picture_draws_skip_mask(runs, capsys):
    svg.main(["--mask", "--base", str(runs / "tiny.safetensors")])
    root = ET.fromstring(capsys.readouterr().out)
    texts = list(root.iter(f"{{{NS['s']}}}text"))
    ids = [int(t.get("data-id")) for t in texts if t.get("class") == "row"]
    V = ModelArgs.preset("tiny").vocab_size
    assert sorted(t for t in ids if t >= V) == list(range(V, V + 6))  # a whole chain: every marker once
    steps = mote.token_steps(torch.tensor([ids]), V)
    mask, positions = mote.skip_mask(steps, torch.tensor([[True, False, False]]))  # the analysis dropped
    rects = root.iter(f"{{{NS['s']}}}rect")
    cells = {(int(r.get("data-q")), int(r.get("data-k"))) for r in rects if r.get("class") == "cell"}
    assert cells == {tuple(qk) for qk in mask[0].nonzero().tolist()}
    assert [int(t.text) for t in texts if t.get("class") == "position"] == positions[0].tolist()


@pytest.mark.parametrize("flags,says", [
    (["--trace", "no/such/folder/route.svg"], "does not exist"),
    (["--trace", "route.svg", "--prompts", "questions.txt"], "give --prompt, not --prompts"),
    (["--trace", "route.svg", "--base", "BASE"], "a base alone has no experts"),
])
def test_trace_bad_input_is_one_line_and_writes_nothing(runs, flags, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "questions.txt").write_text("Hi?\n")
    flags = [str(runs / "tiny.safetensors") if f == "BASE" else f for f in flags]
    adapters = [] if "--base" in flags else ["--adapters", str(runs / "mote")]
    with pytest.raises(SystemExit) as e:
        sample.main([*adapters, *([] if "--prompts" in flags else ["--prompt", "Hi?"]), *flags, *FLAGS])
    message = str(e.value.code)
    assert message.startswith("error: ") and says in message and "\n" not in message
    assert not (tmp_path / "route.svg").exists() and not list(tmp_path.rglob("*.svg"))


@pytest.mark.parametrize("tty,no_color,coloured", [(True, None, True), (True, "1", False), (False, None, False)])
def test_terminal_colour_only_on_a_tty_without_no_color(runs, tty, no_color, coloured, capsys, monkeypatch):
    if no_color:
        monkeypatch.setenv("NO_COLOR", no_color)
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    sample.main(["--adapters", str(runs / "mote"), "--prompt", PROMPT, "--path", "full", *FLAGS])
    assert ("\033[" in capsys.readouterr().out) == coloured


BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.mark.skipif(not any(shutil.which(b) for b in BROWSERS), reason="no headless Chromium here")
@pytest.mark.parametrize("picture", ["route-wifi.svg", "route-grease-fire.svg", "skip-mask.svg"])
def test_a_browser_renders_the_readme_pictures(picture, tmp_path):
    browser = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    png = tmp_path / "shot.png"
    done = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={png}",
                           "--window-size=1000,900", "file://" + os.path.abspath(os.path.join("figures", picture))],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-500:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
