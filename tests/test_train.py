"""train.py on a random tiny base: the validation loss falls, --resume continues the same run,
and each ablation switch trains the variant it names."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import mote
import train
from data import read_chains
from model import ModelArgs, Transformer

DEMO = os.path.join(os.path.dirname(__file__), "..", "data", "demo_chains.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny base with the byte tokenizer, and the 14 shortest demo chains of each shape
    (answer only, analysis + answer, analysis + guidance + answer)."""
    d = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    Transformer(ModelArgs.preset("tiny")).save(str(d / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    chains = sorted(read_chains(DEMO), key=lambda c: sum(len(v) for v in c.values()))
    chains = [c for steps in ({"response"}, {"analysis", "response"}, {"analysis", "guidance", "response"})
              for c in [c for c in chains if set(c) & set(mote.STEPS) == steps][:14]]
    with open(d / "chains.jsonl", "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in chains)
    return d


def run(setup, out, *extra):
    train.main(["--base", str(setup / "tiny.safetensors"), "--data", str(setup / "chains.jsonl"),
                "--out", str(setup / out), "--batch-size", "8", "--micro-batch", "4", "--lr", "3e-3",
                "--val-frac", "0.2", "--seed", "0", *extra])
    return [json.loads(line) for line in open(setup / out / "metrics.jsonl")]


def test_validation_loss_falls(setup):
    log = run(setup, "falls", "--max-iters", "20")
    before, after = log[0], log[-1]
    assert before["iter"] == 0 and after["iter"] == 20
    assert after["val_loss"] < before["val_loss"] - 0.5, (before, after)
    for kind in ("analysis", "guidance", "response"):
        assert after[f"val_{kind}"] < before[f"val_{kind}"]
    assert os.path.exists(setup / "falls" / "adapters.safetensors")
    import xml.etree.ElementTree as ET
    svg = ET.parse(setup / "falls" / "loss.svg").getroot()  # the curve, as train.py last drew it
    lines = [e for e in svg.iter() if e.tag.endswith("polyline")]
    assert len(lines) == 5 and len(lines[0].get("points").split()) == 20  # training loss: one point an iteration


def test_resume_continues_the_same_run(setup, monkeypatch):
    straight = run(setup, "straight", "--max-iters", "6", "--save-every", "3")
    original = train.save_checkpoint

    def crash_after_first_checkpoint(*args):
        original(*args)
        raise KeyboardInterrupt  # the run dies right after writing step 3

    monkeypatch.setattr(train, "save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(setup, "resumed", "--max-iters", "6", "--save-every", "3")
    monkeypatch.setattr(train, "save_checkpoint", original)
    resumed = run(setup, "resumed", "--max-iters", "6", "--save-every", "3", "--resume")
    # equal to fp32 precision: two runs of the same process can differ in the last bits (the CPU
    # matmul kernels depend on how buffers happen to be aligned), so compare to 1e-6, not bit for bit
    assert [r["iter"] for r in resumed] == [r["iter"] for r in straight] == list(range(7))
    for a, b in zip(resumed, straight):
        for key in a.keys() - {"tokens_per_s"}:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["iter"], key)
    with pytest.raises(SystemExit, match=r"--resume with flags that differ from the checkpoint's: "
                                         r"--lr 0.003 -> 0.01; --routing 'step' -> 'token' \(resume"):
        run(setup, "resumed", "--max-iters", "6", "--save-every", "3", "--resume", "--lr", "1e-2", "--routing", "token")


def test_resume_needs_only_out_and_may_extend_max_iters(setup):
    """--resume --out DIR takes every flag from the run's config (the tiny base, its data, its lr, its
    loss weights); a larger --max-iters extends the run; resuming a finished run without one is
    one line."""
    run(setup, "extend", "--max-iters", "4", "--save-every", "2", "--conclusion-weight", "4",
        "--harmful-weight", "2")
    with pytest.raises(SystemExit, match=r"holds 4 iterations, the whole run; give --max-iters above 4"):
        train.main(["--resume", "--out", str(setup / "extend")])
    train.main(["--resume", "--out", str(setup / "extend"), "--max-iters", "6"])
    log = [json.loads(line) for line in open(setup / "extend" / "metrics.jsonl")]
    assert [r["iter"] for r in log] == list(range(7)) and log[-1]["lr"] < 3e-3
    config = json.load(open(setup / "extend" / "train_config.json"))
    assert config["lr"] == 3e-3 and config["max_iters"] == 6 and config["base_abspath"] == str(setup / "tiny.safetensors")
    assert config["conclusion_weight"] == 4 and config["harmful_weight"] == 2


def test_the_run_folder_defaults_to_runs_and_the_base_name(setup, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = train.parse_args(["--base", str(setup / "tiny.safetensors")])
    assert args.out == os.path.join("runs", "tiny") and args.lr == 2e-3 and args.question_expert == "analysis"
    with pytest.raises(SystemExit, match="give --base"):
        train.parse_args([])


def test_train_py_with_only_a_base_starts_the_recipe(setup, monkeypatch, tmp_path, capsys):
    """The design card's command: the recipe's data and flags by default, into runs/<base name>
    (stopped here after one iteration)."""
    monkeypatch.chdir(tmp_path)
    train.main(["--base", str(setup / "tiny.safetensors"), "--max-iters", "1", "--micro-batch", "8"])
    out = capsys.readouterr().out
    assert "data: 1448 chains" in out and "training 1 iterations of 8 chains into runs/tiny" in out
    config = json.load(open(tmp_path / "runs" / "tiny" / "train_config.json"))
    assert config["data"] == [train.RECIPE_DATA] and config["lr"] == 2e-3 and config["epochs"] == train.RECIPE_EPOCHS
    assert config["conclusion_weight"] == config["harmful_weight"] == 1
    assert os.path.exists(tmp_path / "runs" / "tiny" / "adapters.safetensors")


def test_data_from_several_files_in_order_and_an_older_run_resumes(setup):
    """--data takes several files and trains on their chains in order, as if one file; a run saved
    when --data took one file (its config holds a string) resumes as the same run."""
    chains = open(setup / "chains.jsonl").read().splitlines(keepends=True)
    (setup / "first.jsonl").write_text("".join(chains[:20]))
    (setup / "second.jsonl").write_text("".join(chains[20:]))
    one = run(setup, "one-file", "--max-iters", "2")
    train.main(["--base", str(setup / "tiny.safetensors"), "--data", str(setup / "first.jsonl"), str(setup / "second.jsonl"),
                "--out", str(setup / "two-files"), "--batch-size", "8", "--micro-batch", "4", "--lr", "3e-3",
                "--val-frac", "0.2", "--seed", "0", "--max-iters", "2", "--save-every", "1"])
    two = [json.loads(line) for line in open(setup / "two-files" / "metrics.jsonl")]
    val = lambda log: [r["val_loss"] for r in log if "val_loss" in r]
    assert len(val(two)) == 2 and val(two) == pytest.approx(val(one), rel=1e-6)
    ckpt = setup / "two-files" / "checkpoint.safetensors"
    config, iter_num, tensors = checkpoint.read_checkpoint(ckpt)
    assert config["data"] == [str(setup / "first.jsonl"), str(setup / "second.jsonl")]
    config["data"] = str(setup / "chains.jsonl")  # as an older train.py saved it
    save_file(tensors, str(ckpt), metadata={"iter_num": str(iter_num), "config": json.dumps(config)})
    assert checkpoint.read_checkpoint(ckpt)[0]["data"] == [str(setup / "chains.jsonl")]
    train.main(["--resume", "--out", str(setup / "two-files"), "--max-iters", "3"])
    assert json.load(open(setup / "two-files" / "train_config.json"))["data"] == [str(setup / "chains.jsonl")]


def test_a_checkpoint_older_than_a_flag_is_one_clear_line():
    """A run saved before a flag existed trained without it: no silent default, one line naming it."""
    saved = {"lr": 1e-3, "routing": "step"}
    checkpoint.check_resume(saved, dict(saved), "ckpt")
    with pytest.raises(ValueError, match=r"^ckpt: written before --question-expert existed, so it cannot be resumed"):
        checkpoint.check_resume(saved, saved | {"question_expert": "analysis"}, "ckpt")


def test_a_checkpoint_older_than_a_loss_weight_resumes_at_the_plain_mean():
    """A run saved before --harmful-weight (or --conclusion-weight) existed trained with the plain mean:
    it resumes at weight 1, and only at weight 1."""
    saved = {"lr": 1e-3, "routing": "step"}
    checkpoint.check_resume(saved, saved | {"harmful_weight": 1.0, "conclusion_weight": 1.0}, "ckpt")
    with pytest.raises(ValueError, match=r"^ckpt: --resume with flags that differ from the checkpoint's: --harmful-weight 1.0 -> 3.0"):
        checkpoint.check_resume(saved, saved | {"harmful_weight": 3.0}, "ckpt")


def test_max_len_beyond_the_context_is_a_clear_error(setup):
    with pytest.raises(SystemExit, match=r"--max-len 2000 is longer than the model's context \(1024 tokens\)"):
        run(setup, "long", "--max-len", "2000")


def test_question_expert_analysis_reads_every_question_with_the_inference_expert(setup, monkeypatch):
    """--question-expert analysis: every chain's question goes to mote.INFERENCE_QUESTION_EXPERT in
    training, and the step drops are the same draws as the random run's (only the routing differs)."""
    calls, seen = [], {}  # each iteration's (question experts, drops); per run
    original = train.train_iteration

    def record(model, chains, base_vocab, pad_id, micro_batch, question_expert, dropped, *rest):
        calls.append((question_expert.clone(), dropped.clone()))
        return original(model, chains, base_vocab, pad_id, micro_batch, question_expert, dropped, *rest)

    monkeypatch.setattr(train, "train_iteration", record)
    for name in ("random", "analysis"):
        run(setup, "question-" + name, "--max-iters", "2", "--question-expert", name)
        seen[name], calls[:] = calls[:], []
    random, analysis = (torch.stack([q for q, _ in seen[n]]) for n in ("random", "analysis"))
    assert (analysis == mote.INFERENCE_QUESTION_EXPERT).all() and len(set(random.flatten().tolist())) == 3
    assert all(torch.equal(a[1], r[1]) for a, r in zip(seen["analysis"], seen["random"]))


@pytest.mark.parametrize("routing", ["single", "token"])
def test_question_expert_changes_nothing_without_step_routing(setup, routing):
    """A single LoRA and a token-gated bank have no step experts: --question-expert analysis trains
    the same adapters as random (experiment.RECIPE passes it to every variant), to float rounding:
    two CPU runs of one command can differ in the last bits when threads sum in another order."""
    from safetensors.torch import load_file
    for name in ("random", "analysis"):
        run(setup, f"{routing}-{name}", "--max-iters", "2", "--routing", routing, "--question-expert", name)
    random, analysis = (load_file(str(setup / f"{routing}-{n}" / "adapters.safetensors")) for n in ("random", "analysis"))
    assert random.keys() == analysis.keys()
    for k in random:
        torch.testing.assert_close(analysis[k], random[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags,n_experts,routing", [
    (["--routing", "single"], 1, "single"), (["--routing", "token"], 4, "token"),
    (["--no-shared"], 3, "step"), (["--skip-p", "0"], 4, "step")])
def test_ablation_switches(setup, flags, n_experts, routing):
    out = "ablation-" + "-".join(f.strip("-") for f in flags)
    log = run(setup, out, "--max-iters", "1", *flags)
    assert torch.isfinite(torch.tensor(log[-1]["loss"]))
    base = Transformer.from_pretrained(str(setup / "tiny.safetensors"))
    model = mote.load_adapters(base, str(setup / out / "adapters.safetensors"))
    assert {(b.n_experts, b.routing) for b in mote.banks(model)} == {(n_experts, routing)}
