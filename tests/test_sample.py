"""sample.py: the sampler switches experts at step markers, forced paths emit exactly their
markers, and batched decoding equals decoding one prompt at a time."""
import json

import numpy as np
import pytest
import torch

import mote
from model import ModelArgs, Transformer
from sample import generate, pick, split_steps

V = 264
A, A_, G, G_, R, R_ = range(V, V + 6)
TEXT, STOP = 65, 260


class MarkerHappyModel(torch.nn.Module):
    """A stand-in model that records the route it is given for every token and wants to write
    three text tokens per step, then close the step, and at a step boundary prefers <|guidance|>:
    scores <g> 12 > text 11.5 (while a step has < 3 text tokens) > end markers 11 > <a> 10 > <r> 9."""

    def __init__(self):
        super().__init__()
        self.args = ModelArgs.preset("tiny")
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.dtype = torch.float32
        self.routes, self.seen = [], []

    def forward(self, tokens, positions=None, mask=None, cache=None, route=None):
        cache.length += tokens.shape[1]
        self.routes += route[0].tolist() if route is not None else []
        self.seen += tokens[0].tolist()
        since_marker = 0
        for t in reversed(self.seen):
            if t >= V:
                break
            since_marker += 1
        logits = torch.full((1, tokens.shape[1], V + 6), -100.0)
        logits[..., [G, A_, G_, R_, A, R]] = torch.tensor([12.0, 11, 11, 11, 10, 9])
        logits[..., TEXT] = 11.5 if since_marker < 3 else 0.0
        return logits


def run_path(path):
    model = MarkerHappyModel()
    out = generate(model, [[1, 2, 3]], [STOP], max_new_tokens=40, experts=True, path=path)[0]
    return model, out


@pytest.mark.parametrize("path,markers", [
    ("auto", [G, G_, R, R_]),  # the model's own choice: it skips the analysis
    ("direct", [R, R_]),
    ("analysis", [A, A_, R, R_]),
    ("full", [A, A_, G, G_, R, R_]),
])
def test_forced_paths_emit_exactly_their_markers(path, markers):
    _, out = run_path(path)
    assert [t for t in out if t >= V] == markers
    assert out[-1] == R_  # generation stops after the response
    taken = [name for name, ids in split_steps(out, V).items() if ids]
    assert all(split_steps(out, V)[name] == [TEXT] * 3 for name in taken)


def test_an_end_of_turn_cannot_cut_a_chain_short():
    class EagerToStop(MarkerHappyModel):  # prefers to end the turn whenever it may write text
        def forward(self, *a, **kw):
            logits = super().forward(*a, **kw)
            logits[..., STOP] = 50.0
            return logits
    out = generate(EagerToStop(), [[1, 2, 3]], [STOP], max_new_tokens=40, experts=True, path="direct",
                   max_step_tokens=2)[0]
    assert out == [R, TEXT, TEXT, R_]  # the step grammar keeps it inside the chain until <|/response|>
    plain = generate(EagerToStop(), [[1, 2, 3]], [STOP], max_new_tokens=40, experts=False)[0]
    assert plain == [STOP]  # without experts an end of turn ends the answer


def test_a_step_is_closed_after_max_step_tokens():
    model = MarkerHappyModel()  # it wants 3 text tokens per step
    out = generate(model, [[1, 2, 3]], [STOP], max_new_tokens=40, experts=True, path="full", max_step_tokens=2)[0]
    assert out == [A, TEXT, TEXT, A_, G, TEXT, TEXT, G_, R, TEXT, TEXT, R_]


def test_sampler_switches_experts_at_the_markers():
    """Every token is processed by the expert of its step: the question by the inference expert,
    a start marker by the step it opens, an end marker by its own step."""
    model, out = run_path("full")
    fed = [1, 2, 3] + out[:-1]  # the prompt, then each generated token is fed back (the last is not)
    assert model.seen == fed
    q = mote.INFERENCE_QUESTION_EXPERT
    expected = [q, q, q] + [0] * 5 + [1] * 5 + [2] * 4  # <a> x x x </a> | <g> x x x </g> | <r> x x x
    assert model.routes == expected
    assert split_steps(out, V) == {"analysis": [TEXT] * 3, "guidance": [TEXT] * 3, "response": [TEXT] * 3}


@pytest.mark.parametrize("threshold,markers", [(None, [G, G_, R, R_]), (0.95, [G, G_, R, R_]), (0.96, [R, R_])])
def test_a_steps_threshold_sets_the_auto_paths_first_choice(threshold, markers):
    """At the question's end P(<a>) + P(<g>) = 0.958 (scores 10 and 12 against <r> 9): a threshold up
    to that takes the steps (the likelier start marker, <g>), a higher one answers directly."""
    model = MarkerHappyModel()
    out = generate(model, [[1, 2, 3]], [STOP], max_new_tokens=40, experts=True, path="auto", steps_threshold=threshold)[0]
    assert [t for t in out if t >= V] == markers


@pytest.mark.parametrize("threshold,markers", [(0.9, [A, A_, G, G_, R, R_]), (0.93, [A, A_, R, R_]), (0.96, [R, R_])])
def test_the_second_choice_takes_the_guidance_by_the_paths_probability(threshold, markers):
    """--second-choice: the steps start with the analysis (not the likelier <g>), and after it the
    guidance is taken iff P(steps) x P(<g> | analysis) >= T: 0.958 x 0.953 = 0.913 (<g> 12 against
    <r> 9). At 0.93 the first choice takes the steps (0.958) and the second answers."""
    model = MarkerHappyModel()
    out = generate(model, [[1, 2, 3]], [STOP], max_new_tokens=40, experts=True, path="auto", steps_threshold=threshold,
                   second_choice=True)[0]
    assert [t for t in out if t >= V] == markers


def tiny_with_experts():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    mote.attach(model)
    with torch.no_grad():
        for b in mote.banks(model):
            b.B.normal_(0, 0.5)
    return model


def test_calibrates_scores_predict_the_samplers_first_choice():
    """calibrate.p_steps, batched differently, is the score take_steps thresholds in generate."""
    import calibrate
    from tokenizer import byte_tokenizer
    model, tok = tiny_with_experts(), byte_tokenizer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".new"):  # the marker rows: not all alike
                p.normal_(0, 0.5)
    questions = [f"question number {i}?" for i in range(12)]
    scores = calibrate.p_steps(model, tok, questions, batch_size=5)
    t = sum(sorted(scores)[5:7]) / 2  # between two scores: batching moves a score in its last bits, not across t
    out = generate(model, [tok.chat(q) for q in questions], tok.stop_ids, max_new_tokens=1, experts=True, steps_threshold=t)
    assert [ids[0] != R for ids in out] == [s >= t for s in scores] and 0 < sum(s >= t for s in scores) < 12
    assert calibrate.auc([1, 2], [0, 2]) == 2.5 / 4


def test_calibrates_second_choice_scores_predict_the_samplers_second_choice():
    """calibrate.scores with second_choice (its own greedy analyses, batched differently) is the
    product take_steps thresholds after the analysis: a row reaches the guidance iff its score >= T."""
    import calibrate
    from tokenizer import byte_tokenizer
    model, tok = tiny_with_experts(), byte_tokenizer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".new"):
                p.normal_(0, 0.5)
    questions = [f"question number {i}?" for i in range(12)]
    first = calibrate.p_steps(model, tok, questions)
    scores = calibrate.scores(model, tok, questions, second_choice=True, max_step_tokens=4)
    t = sum(sorted(scores)[5:7]) / 2  # between two scores, as above
    out = generate(model, [tok.chat(q) for q in questions], tok.stop_ids, max_new_tokens=8, experts=True,
                   steps_threshold=t, second_choice=True, max_step_tokens=4)
    assert [G in ids for ids in out] == [s >= t for s in scores] and 0 < sum(s >= t for s in scores) < 12
    assert any(f >= t > s for f, s in zip(first, scores))  # some row takes the analysis, then answers
    assert all((A in ids) == (f >= t) for ids, f in zip(out, first))


def test_auc_interval_is_hanley_mcneils():
    """calibrate.auc_interval against two oracles: at AUC 0.5 the exact Mann-Whitney null variance,
    (n1 + n2 + 1) / (12 n1 n2); and, for exponential scores (the model behind the formula), the spread of
    the AUC over 4,000 simulated draws."""
    import calibrate
    low, high = calibrate.auc_interval(0.5, 50, 40)
    assert high - 0.5 == pytest.approx(0.5 - low) == pytest.approx(1.96 * (91 / (12 * 50 * 40)) ** 0.5)
    rng, n1, n2 = np.random.default_rng(0), 30, 20
    harmful, benign = rng.exponential(1.0, (4000, n1, 1)), rng.exponential(0.25, (4000, 1, n2))  # AUC 0.8
    aucs = (harmful > benign).mean(axis=(1, 2))
    low, high = calibrate.auc_interval(0.8, n1, n2)
    assert (high - low) / (2 * 1.96) == pytest.approx(aucs.std(), rel=0.05)
    assert calibrate.auc_interval(1.0, 5, 5) == [1.0, 1.0]


def test_the_suggested_threshold_separates_best():
    """calibrate.best_threshold: the grid point with most harmful scores at or above it and benign
    below it; of equals, the one nearest 0.5."""
    import calibrate
    harmful, benign = [0.9, 0.7, 0.3, 0.25], [0.1, 0.2, 0.22, 0.35]
    assert calibrate.best_threshold(harmful, benign) == 0.25  # 4/4 + 3/4 = 1.75 for t in (0.22, 0.25]: nearest 0.5
    assert calibrate.best_threshold([0.9], [0.1]) == 0.5  # every t in (0.1, 0.9] separates
    assert calibrate.best_threshold([0.96, 0.97], [0.95, 0.1]) == 0.96


def test_the_target_threshold_meets_the_targets_with_most_room():
    """calibrate.target_threshold weighs a missed harmful question against 1 - 0.90 and a benign one
    sent into the steps against 1 - 0.80, where Youden's J weighs them alike."""
    import calibrate
    harmful, benign = [0.2] * 2 + [0.8] * 8, [0.1] * 8 + [0.3] * 2
    # t in (0.3, 0.8]: 2 of 10 harmful missed, 0.2 / 0.1 = 2; t in (0.1, 0.2]: 2 of 10 benign in, 0.2 / 0.2 = 1
    assert calibrate.target_threshold(harmful, benign) == 0.2
    assert calibrate.best_threshold(harmful, benign) == 0.5  # J = 1.8 on both sides: nearest 0.5
    assert calibrate.target_threshold(harmful, benign, refusal=0.8, compliance=0.9) == 0.5
    assert calibrate.target_threshold([0.8] * 4, [0.5] * 3 + [0.1] * 7) == 0.51  # (0.5, 0.8] meets both


def test_calibrate_writes_each_threshold_in_its_own_field(tmp_path, monkeypatch):
    """calibrate.py --out on the scores of the test above, where the two rules disagree: a swap of the
    JSON's fields fails here, whatever a CPU's kernels make of a random model's scores."""
    import calibrate
    given = iter([[0.2] * 2 + [0.8] * 8, [0.1] * 8 + [0.3] * 2])  # main scores the harmful set, then the benign
    monkeypatch.setattr(calibrate.sample, "load", lambda *args: (None, None))
    monkeypatch.setattr(calibrate, "scores", lambda *args: next(given))
    calibrate.main(["--adapters", str(tmp_path), "--out", str(tmp_path / "c.json")])
    written = json.load(open(tmp_path / "c.json"))
    assert (written["target_threshold"], written["best_threshold"]) == (0.2, 0.5)


@pytest.mark.parametrize("experts", [False, True])
def test_batch_decoding_equals_one_by_one(experts):
    model = tiny_with_experts() if experts else Transformer(ModelArgs.preset("tiny")).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    kw = dict(stop_ids=[STOP], max_new_tokens=12, experts=experts, path="full" if experts else "auto")
    batched = generate(model, prompts, **kw)
    assert batched == [generate(model, [p], **kw)[0] for p in prompts]
    if experts:
        assert all(out[0] == A for out in batched)


def test_merged_experts_decode_like_routed_ones():
    model = tiny_with_experts()
    kw = dict(stop_ids=[STOP], max_new_tokens=16, experts=True, path="full")
    assert generate(model, [[5, 6, 7]], merge=True, **kw) == generate(model, [[5, 6, 7]], **kw)
    assert all(b.merged is None for b in mote.banks(model))


def test_sampling_is_seeded_and_top_p_keeps_the_head():
    logits = torch.tensor([[4.0, 3.0, 0.0, -2.0]])
    g = lambda n=1: [torch.Generator().manual_seed(i) for i in range(n)]
    draws = [pick(logits, 1.0, 0.5, g()).item() for _ in range(5)]
    assert draws == [0] * 5  # p(0) = 0.70 > top_p: only token 0 survives
    a = [pick(logits.expand(64, 4), 1.0, 1.0, g(64)) for _ in range(2)]
    assert torch.equal(a[0], a[1]) and len(set(a[0].tolist())) > 1
    assert pick(logits, 0.0, 0.9).item() == 0


def test_a_bad_prompts_file_is_one_line_naming_file_and_line(tmp_path):
    import sample
    bad = tmp_path / "q.txt"
    bad.write_text('How do I bake bread?\n{"question": 3}\n')
    with pytest.raises(SystemExit, match=r"q.txt:2: expected a question per line or a JSON object"):
        sample.main(["--base", "unused.safetensors", "--prompts", str(bad)])
    good = tmp_path / "good.txt"
    good.write_text('How do I bake bread?\n\n{"question": "Is it late?"}\n')
    assert sample.read_prompts(str(good)) == {1: "How do I bake bread?", 3: "Is it late?"}
    bad.write_text('How do I bake bread?\n\n{"question": 3}\n')  # the line number counts blank lines
    with pytest.raises(SystemExit, match=r"q.txt:3: expected a question"):
        sample.main(["--base", "unused.safetensors", "--prompts", str(bad)])


def test_prompts_file_to_jsonl_end_to_end(tmp_path):
    """sample.py --prompts FILE --out FILE.jsonl on a random tiny base, without and with experts."""
    import sample
    torch.manual_seed(0)
    base = str(tmp_path / "tiny.safetensors")
    Transformer(ModelArgs.preset("tiny")).save(base, metadata={"tokenizer": "byte"})
    prompts = tmp_path / "q.txt"
    prompts.write_text('How do I bake bread?\n{"question": "Is it late?"}\n')
    sample.main(["--base", base, "--prompts", str(prompts), "--out", str(tmp_path / "plain.jsonl"), "--max-new-tokens", "5"])
    assert [json.loads(line)["question"] for line in open(tmp_path / "plain.jsonl")] == ["How do I bake bread?", "Is it late?"]
    model = Transformer.from_pretrained(base)
    mote.attach(model)
    mote.save_adapters(model, str(tmp_path / "adapters.safetensors"))
    sample.main(["--base", base, "--adapters", str(tmp_path / "adapters.safetensors"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "experts.jsonl"), "--path", "full", "--max-new-tokens", "12", "--max-step-tokens", "2"])
    records = [json.loads(line) for line in open(tmp_path / "experts.jsonl")]
    assert [set(r) >= {"analysis", "guidance", "response"} for r in records] == [True, True]
    assert all(r["n_tokens"] == 12 for r in records)  # <a> x x </a> <g> x x </g> <r> x x </r>


@pytest.mark.parametrize("experts", [False, True])
def test_a_rows_sample_does_not_depend_on_its_batch(experts):
    """Sampling (temperature > 0) draws each row from its own generator, seeded by the prompt: alone,
    in a batch, or at another place in the batch, a prompt gets the same sample."""
    model = tiny_with_experts() if experts else Transformer(ModelArgs.preset("tiny")).eval()
    kw = dict(stop_ids=[STOP], max_new_tokens=12, experts=experts, temperature=1.0, top_p=1.0, seed=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [15]]
    alone = [generate(model, [p], **kw)[0] for p in prompts]
    assert generate(model, prompts, **kw) == alone
    assert generate(model, prompts[::-1], **kw) == alone[::-1]
    assert generate(model, [prompts[0]], **kw | {"seed": 4})[0] != alone[0]


def test_a_prompt_longer_than_the_context_is_a_clear_error():
    model = Transformer(ModelArgs.preset("tiny")).eval()  # context: 1024 tokens
    with pytest.raises(ValueError, match="1024 tokens does not fit the model's context"):
        generate(model, [[5] * 1024], [STOP], max_new_tokens=4)
    assert len(generate(model, [[5] * 1020], [], max_new_tokens=10)[0]) == 4  # stops at the context's end


class BrokenModel(MarkerHappyModel):
    """Broken experts: every score NaN (or +inf), as from adapters trained into NaN."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, tokens, positions=None, mask=None, cache=None, route=None):
        return torch.full_like(super().forward(tokens, positions, mask, cache, route), self.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_broken_experts_cannot_break_the_step_grammar(value, temperature):
    out = generate(BrokenModel(value), [[1, 2, 3]], [STOP], max_new_tokens=40, experts=True, path="auto",
                   temperature=temperature, max_step_tokens=2)[0]
    markers = [t for t in out if t >= V]
    assert markers[-1] == R_ and STOP not in out and len(markers) % 2 == 0
    assert all(b == a + 1 and a % 2 == V % 2 for a, b in zip(markers[::2], markers[1::2]))  # each step closes itself
    assert all(n <= 2 for n in map(len, split_steps(out, V).values()))


def test_calibrate_out_in_a_missing_directory_is_one_line_before_any_work(tmp_path):
    import calibrate
    with pytest.raises(SystemExit) as exit:
        calibrate.main(["--adapters", str(tmp_path / "none"), "--out", str(tmp_path / "no" / "c.json")])
    assert str(exit.value.code).startswith("error: --out ") and "no such directory" in str(exit.value.code)
