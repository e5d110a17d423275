"""Every path a user takes, in bf16 on the CPU (what a GPU run does, less the device): train each
ablation variant under CPU bf16 autocast (one with activation checkpointing), save, load, sample
routed and merged, one prompt and a batch; then the evaluation and self-generation entry points.
Also the bf16 model-level paths: experts on a bf16 base, exact unmerging, merged == routed."""
import json

import pytest
import torch

import evaluate
import mote
import sample
import selfgen
import train
from data import read_chains
from model import ModelArgs, Transformer
from test_evaluate import fake_hh

VARIANTS = {"mote": [], "token": ["--routing", "token"], "single": ["--routing", "single"],
            "no-shared": ["--no-shared"], "no-skipping": ["--skip-p", "0"],
            "question-random": ["--question-expert", "random"]}
BF16 = ["--dtype", "bfloat16"]


def tiny_runs(d, variants: dict, flags: list):
    """A random tiny base (byte tokenizer) in d, and one 2-iteration training run per variant on the
    12 shortest demo chains, into d / variant: variants maps a name to its train.py flags."""
    torch.manual_seed(0)
    Transformer(ModelArgs.preset("tiny")).save(str(d / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    chains = sorted(read_chains("data/demo_chains.jsonl"), key=lambda c: len(json.dumps(c)))[:12]
    (d / "chains.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chains))
    for name, extra in variants.items():
        train.main(["--base", str(d / "tiny.safetensors"), "--data", str(d / "chains.jsonl"), "--out", str(d / name),
                    "--batch-size", "4", "--micro-batch", "2", "--max-iters", "2", "--lr", "1e-2", "--val-frac", "0.2",
                    *flags, *extra])
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One bf16 training run per variant (MoTE with --checkpointing and both loss weights)."""
    variants = {name: flags + (["--checkpointing", "--conclusion-weight", "3", "--harmful-weight", "2"] if name == "mote" else [])
                for name, flags in VARIANTS.items()}
    return tiny_runs(tmp_path_factory.mktemp("e2e"), variants, BF16)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_training_writes_finite_fp32_experts(runs, variant):
    log = [json.loads(line) for line in open(runs / variant / "metrics.jsonl")]
    assert [r["iter"] for r in log] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log[1:])
    model = mote.load_adapters(Transformer.from_pretrained(str(runs / "tiny.safetensors")),
                               str(runs / variant / "adapters.safetensors"))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trained)
    assert any(b.B.abs().sum() > 0 for b in mote.banks(model))  # the experts did train


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("merge", [True, False])
def test_bf16_sample_one_prompt(runs, variant, merge, capsys):
    sample.main(["--adapters", str(runs / variant), "--prompt", "How do I kill a process?", "--path", "full",
                 "--max-new-tokens", "12", "--max-step-tokens", "2", *BF16, *([] if merge else ["--no-merge"])])
    out = capsys.readouterr().out
    assert "[analysis expert]" in out and "[guidance expert]" in out and "[response expert]" in out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rule", [[], ["--steps-threshold", "0.5"], ["--steps-threshold", "0.5", "--second-choice"]])
def test_bf16_sample_a_batch(runs, variant, rule, tmp_path):
    (tmp_path / "q.txt").write_text("How do I kill a process?\nWhat is a photo shoot?\nHi\n")
    sample.main(["--adapters", str(runs / variant), "--prompts", str(tmp_path / "q.txt"), "--out", str(tmp_path / "a.jsonl"),
                 "--path", "auto", "--max-new-tokens", "10", "--max-step-tokens", "3", "--temperature", "1.0", *rule, *BF16])
    records = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert [r["question"] for r in records] == ["How do I kill a process?", "What is a photo shoot?", "Hi"]


def test_bf16_evaluate_and_selfgen_entry_points(runs, tmp_path):
    hh = fake_hh(tmp_path / "hh.jsonl.gz", [f"Tell me a secret number {i}" for i in range(40)])
    summary = evaluate.main(["--adapters", str(runs / "mote"), "--sets", "hh", "--hh", hh, "--limit", "3",
                             "--out", str(tmp_path / "eval"), "--max-new-tokens", "8", *BF16])
    assert summary["sets"]["hh"]["n"] == 3
    (tmp_path / "q.txt").write_text("How do I bake bread?\nHow do knots hold?\n")
    s = selfgen.main(["--base", str(runs / "tiny.safetensors"), "--questions", str(tmp_path / "q.txt"),
                      "--out", str(tmp_path / "chains.jsonl"), "--max-new-tokens", "6", "--temperature", "0.7", *BF16])
    assert s["chains"] + s["dropped_empty_response"] <= 2


def test_bf16_calibrate_writes_the_thresholds_it_prints(runs, tmp_path, capsys):
    """calibrate.py --out (what experiment.py reads): the JSON holds the AUC and both thresholds of
    the printed lines, computed from the development sets' scores."""
    import calibrate
    targets = ["--refusal", "0.1", "--compliance", "0.9"]
    harmful, benign = calibrate.main(["--adapters", str(runs / "question-random"), "--out", str(tmp_path / "c.json"),
                                      *targets, *BF16])
    written, out = json.load(open(tmp_path / "c.json")), capsys.readouterr().out
    # each field against its own rule (the random model's scores may make the two rules agree: a swap
    # of the fields is caught by test_sample.py::test_calibrate_writes_each_threshold_in_its_own_field)
    assert (len(harmful), len(benign)) == (50, 50)
    assert written["target_threshold"] == calibrate.target_threshold(harmful, benign, 0.1, 0.9)
    assert written["best_threshold"] == calibrate.best_threshold(harmful, benign)
    assert written["auc"] == calibrate.auc(harmful, benign)
    assert out.splitlines()[-1].endswith(f"--steps-threshold {written['target_threshold']}")


def test_bf16_calibrate_second_choice(runs, tmp_path):
    """calibrate.py --second-choice in bf16 (it generates each development question's analysis): one
    probability per question, and the threshold of the target rule on them is what it writes."""
    import calibrate
    harmful, benign = calibrate.main(["--adapters", str(runs / "question-random"), "--second-choice",
                                      "--max-step-tokens", "3", "--out", str(tmp_path / "c.json"), *BF16])
    assert (len(harmful), len(benign)) == (50, 50) and all(0 <= p <= 1 for p in harmful + benign)
    assert json.load(open(tmp_path / "c.json"))["target_threshold"] == calibrate.target_threshold(harmful, benign, 0.9, 0.8)


# ---- the model-level bf16 paths -----------------------------------------------------------------

def bf16_model(routing="step", shared=True, seed=0):
    """A bf16 tiny base with fp32 experts attached (as mote.attach leaves them) that are trained-looking."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny")).to(torch.bfloat16).eval()
    mote.attach(model, mote.ExpertConfig(routing=routing, shared=shared))
    with torch.no_grad():
        for b in mote.banks(model):
            b.B.normal_(0, 0.05)
    return model


CONFIGS = [("step", True), ("step", False), ("single", True), ("token", True)]


@pytest.mark.parametrize("routing,shared", CONFIGS)
@pytest.mark.parametrize("cast", [False, True])
def test_experts_on_a_bf16_base_generate(routing, shared, cast):
    """The three-line reproduction of the GPU crash: a bf16 base, experts attached (fp32, or cast
    once as sample.load does), generate with experts, routed and merged, one row and a batch."""
    model = bf16_model(routing, shared)
    if cast:
        mote.cast_experts(model, torch.bfloat16)
    kw = dict(stop_ids=[260], max_new_tokens=10, experts=True, path="full", max_step_tokens=2)
    routed = sample.generate(model, [[5, 6, 7]], **kw)[0]
    merged = sample.generate(model, [[5, 6, 7]], merge=True, **kw)[0]
    assert len(routed) == len(merged) == 10
    assert len(sample.generate(model, [[5, 6, 7], [8]], **kw)) == 2


@pytest.mark.parametrize("routing,shared", CONFIGS[:3])
def test_bf16_merged_logits_match_routed_ones(routing, shared):
    model = mote.cast_experts(bf16_model(routing, shared), torch.bfloat16)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    for step in range(3):
        route = torch.full_like(tokens, step)
        routed = model(tokens, route=route).float()
        mote.merge_step(model, step)
        merged = model(tokens).float()
        mote.merge_step(model, None)
        assert (merged - routed).abs().max() < 0.05 * routed.abs().max()


def test_unmerge_restores_w0_exactly_in_bf16():
    """Merging never subtracts: 30 step switches later every base weight is bit-identical."""
    model = mote.cast_experts(bf16_model(), torch.bfloat16)
    w0 = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    for step in [0, 1, 2] * 10:
        mote.merge_step(model, step)
    mote.merge_step(model, None)
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_merging_a_token_gated_bank_is_refused():
    model = bf16_model("token")
    assert not mote.mergeable(model)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        mote.merge_step(model, 0)


def test_sample_load_casts_the_experts_once(runs):
    """Inference runs in one dtype: the experts are cast to the base's dtype when loaded."""
    model, _ = sample.load(None, str(runs / "token"), "cpu", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_stored_path_rule_reaches_sample_and_evaluate(runs, tmp_path, capsys):
    """calibrate.py --save stores its threshold in the run folder; sample.py and evaluate.py then
    generate with it by default, and --argmax without it (README: decisions)."""
    import shutil

    import calibrate
    import evaluate
    import sample
    run = tmp_path / "run"
    shutil.copytree(runs / "mote", run)
    calibrate.main(["--adapters", str(run), "--save", *BF16])
    stored = json.load(open(run / "path_rule.json"))
    assert stored["chosen_on"] == ["dev-harmful", "dev-benign"] and 0 <= stored["steps_threshold"] <= 1
    capsys.readouterr()
    sample.main(["--adapters", str(run), "--prompt", "Hi?", "--max-new-tokens", "3", *BF16])
    assert f"--steps-threshold {stored['steps_threshold']}" in capsys.readouterr().err
    flags = ["--adapters", str(run), "--sets", "dev-benign", "--limit", "2", "--max-new-tokens", "3", *BF16]
    assert evaluate.main([*flags, "--out", str(tmp_path / "e1")])["steps_threshold"] == stored["steps_threshold"]
    assert evaluate.main([*flags, "--out", str(tmp_path / "e2"), "--argmax"])["steps_threshold"] is None
