"""Faults and bad input (issue 12): every case ends in one line, `error: <file>[:line]: ...`, a
non-zero exit, and leaves every file that was there as it was.

Each row runs train.py or sample.py in-process on a copy of a small world: a random tiny base, six
short demo chains, and a finished run (run/: metrics.jsonl, checkpoint.safetensors at iteration 2,
adapters.safetensors)."""
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import mote
import sample
import train
from data import read_chains
from model import ModelArgs, Transformer

DEMO = os.path.join(os.path.dirname(__file__), "..", "data", "demo_chains.jsonl")
TRAIN = ["train", "--base", "tiny.safetensors", "--data", "chains.jsonl", "--batch-size", "2",
         "--micro-batch", "2", "--lr", "1e-3", "--val-frac", "0.2", "--max-iters", "2", "--save-every", "1"]
SAMPLE = ["sample", "--base", "tiny.safetensors", "--max-new-tokens", "4"]
MAIN = {"train": train.main, "sample": sample.main}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    Transformer(ModelArgs.preset("tiny")).save(str(d / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    chains = sorted(read_chains(DEMO), key=lambda c: sum(len(v) for v in c.values()))[:6]
    (d / "chains.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chains))
    with pytest.MonkeyPatch.context() as m:
        m.chdir(d)
        run_main(TRAIN + ["--out", "run"])
    return d


@pytest.fixture
def here(world, tmp_path, monkeypatch):
    """A copy of the world, the working directory (every path in an argv is relative to it)."""
    shutil.copytree(world, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


def run_main(argv):
    return MAIN[argv[0]](argv[1:])


# ---- what each row does to the world before it runs ---------------------------------------------------

def cut_in_half(path):
    return lambda d, _: (d / path).write_bytes((d / path).read_bytes()[: (d / path).stat().st_size // 2])


def write(path, content: bytes):
    return lambda d, _: (d / path).write_bytes(content)


def base_with(edit, path="tiny.safetensors"):
    """A copy of the tiny base (under path) with edit(tensors) applied."""
    def prepare(d, _):
        tensors = load_file(d / "tiny.safetensors")
        edit(tensors)
        save_file(tensors, d / path, metadata={"tokenizer": "byte", "model_args": ModelArgs.preset("tiny").to_json()})
    return prepare


def nan_weight(tensors):
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")


def chains_with_a_long_validation_chain(d, _):
    """The chains, the one that --val-frac 0.2 holds out made longer than --max-len 300."""
    chains = [json.loads(line) for line in open(d / "chains.jsonl")]
    _, (held_out,) = train.split(list(range(len(chains))), 0.2, 0)
    chains[held_out]["response"] += " more" * 80
    (d / "long.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chains))


def nan_gradient_at_iteration(n):
    """Patch train_iteration to leave a NaN gradient at iteration n (1-based)."""
    def patch(_, monkeypatch):
        original, calls = train.train_iteration, []

        def poisoned(model, *args):
            out = original(model, *args)
            calls.append(1)
            if len(calls) == n:
                next(p for p in model.parameters() if p.requires_grad).grad.view(-1)[0] = float("nan")
            return out
        monkeypatch.setattr(train, "train_iteration", poisoned)
    return patch


def checkpoint_of_iteration(n):
    def check(d):
        meta_iter = checkpoint.read_checkpoint(str(d / "new" / "checkpoint.safetensors"))[1]
        tensors = load_file(d / "new" / "checkpoint.safetensors")
        assert meta_iter == n and all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())
        assert [json.loads(line)["iter"] for line in open(d / "new" / "metrics.jsonl")][-1] == n
    return check


# ---- the table ---------------------------------------------------------------------------------------

def row(id, argv, message, prepare=None, created=(), then=None):
    """A case: main's argv (argv[0]: which main), the message after "error: " (a regex), prepare(d,
    monkeypatch) before the run, the paths a failure may add, then(d) after (d: the world's copy)."""
    return pytest.param(argv, message, prepare, created, then, id=id)


ROWS = [
    row("nan-loss-lr-inf", TRAIN + ["--out", "new", "--lr", "inf"],
        r"argument --lr: must be a finite number > 0, got 'inf'"),
    row("nan-loss-base-with-a-nan-weight", TRAIN + ["--out", "new"],
        r"tiny.safetensors: the validation loss before any training is nan: the base holds NaN or inf weights",
        base_with(nan_weight)),
    row("nan-loss-base-with-a-nan-weight-no-validation", TRAIN + ["--out", "new", "--val-frac", "0"],
        r"new: iteration 1: the loss is nan and the gradient norm nan; stopped before its optimizer step, "
        r"keeping no checkpoint and writing no adapters", base_with(nan_weight), ("new", "new/train_config.json")),
    row("nan-gradient-mid-run-keeps-the-last-checkpoint", TRAIN + ["--out", "new", "--max-iters", "4"],
        r"new: iteration 3: the loss is [\d.]+ and the gradient norm nan; .* keeping the checkpoint of iteration 2",
        nan_gradient_at_iteration(3),
        ("new", "new/train_config.json", "new/metrics.jsonl", "new/checkpoint.safetensors"),
        checkpoint_of_iteration(2)),
    row("run-folder-without-resume", TRAIN + ["--out", "run"],
        r"run: holds a run \(metrics.jsonl, checkpoint.safetensors, adapters.safetensors, loss.svg\); "
        r"give --resume to continue it or --overwrite to replace it"),
    row("failed-run-leaves-no-out-folder", TRAIN + ["--out", "new", "--data", "bad.jsonl"],
        r"bad.jsonl:1: invalid JSON", write("bad.jsonl", b"{not json\n")),
    row("max-len-beyond-the-context", TRAIN + ["--out", "new", "--max-len", "2000"],
        r"--max-len 2000 is longer than the model's context \(1024 tokens\)"),
    row("adapters-random-file", SAMPLE + ["--adapters", "random.safetensors", "--prompt", "Hi"],
        r"random.safetensors: not an adapters file written by train.py",
        write("random.safetensors", bytes(range(256)) * 8)),
    row("adapters-cut-in-half", SAMPLE + ["--adapters", "run/adapters.safetensors", "--prompt", "Hi"],
        r"run/adapters.safetensors: not an adapters file written by train.py \(.*incomplete",
        cut_in_half("run/adapters.safetensors")),
    row("adapters-the-base-itself", SAMPLE + ["--adapters", "tiny.safetensors", "--prompt", "Hi"],
        r"tiny.safetensors: not an adapters file written by train.py \(no 'expert_config' metadata\)"),
    row("adapters-folder-that-does-not-exist", ["sample", "--adapters", "runs/nope", "--prompt", "Hi"],
        r"runs/nope: does not exist"),
    row("resume-checkpoint-cut-in-half", TRAIN + ["--out", "run", "--resume"],
        r"run/checkpoint.safetensors: not a checkpoint written by train.py, or cut short",
        cut_in_half("run/checkpoint.safetensors")),
    row("resume-metrics-missing", TRAIN + ["--out", "run", "--resume"],
        r"run/metrics.jsonl: does not exist; --resume needs the run's log",
        lambda d, _: os.remove(d / "run/metrics.jsonl")),
    row("resume-metrics-half-written", TRAIN + ["--out", "run", "--resume"],
        r"run/metrics.jsonl: has no record of iteration 2, the checkpoint's: the log is cut short",
        cut_in_half("run/metrics.jsonl")),
    row("resume-metrics-bad-line", TRAIN + ["--out", "run", "--resume"],
        r"run/metrics.jsonl:1: not a metrics record",
        lambda d, _: (d / "run/metrics.jsonl").write_text("oops\n" + (d / "run/metrics.jsonl").read_text())),
    row("resume-another-rank", TRAIN + ["--out", "run", "--resume", "--rank", "8"],
        r"run/checkpoint.safetensors: --resume with flags that differ from the checkpoint's: --rank 16 -> 8"),
    row("prompts-not-utf8", SAMPLE + ["--prompts", "q.txt"], r"q.txt: not UTF-8 text \(invalid .* at byte 3\)",
        write("q.txt", b"caf\xe9?\n")),
    row("prompts-only-blank-lines", SAMPLE + ["--prompts", "q.txt"], r"q.txt: no questions",
        write("q.txt", b"\n  \n\n")),
    row("prompt-longer-than-the-context", SAMPLE + ["--prompts", "q.txt", "--out", "answers.jsonl"],
        r"q.txt:3: the question has \d+ tokens, more than the model's context \(1024\)",
        lambda d, m: [write("q.txt", b"Hi?\n\n" + b"why " * 300 + b"\n")(d, m),
                      write("answers.jsonl", b'{"earlier": "answers"}\n')(d, m)]),
    row("out-is-a-file", TRAIN + ["--out", "chains.jsonl"], r"chains.jsonl: is a file"),
    row("batch-size-0", TRAIN + ["--out", "new", "--batch-size", "0"],
        r"argument --batch-size: must be an integer > 0, got '0'"),
    row("lr-nan", TRAIN + ["--out", "new", "--lr", "nan"], r"argument --lr: must be a finite number > 0, got 'nan'"),
    row("base-missing-tensor", TRAIN + ["--out", "new", "--base", "broken.safetensors"],
        r"broken.safetensors: does not match the model config: missing tensors: norm.weight$",
        base_with(lambda t: t.pop("model.norm.weight"), "broken.safetensors")),
    row("base-wrong-shape", TRAIN + ["--out", "new", "--base", "broken.safetensors"],
        r"broken.safetensors: does not match the model config: shape mismatch: "
        r"layers.0.self_attn.k_proj.weight: expected \(32, 64\), got \(64, 64\)$",
        base_with(lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}),
                  "broken.safetensors")),
    row("validation-chains-all-too-long", TRAIN + ["--out", "new", "--data", "long.jsonl", "--max-len", "300"],
        r"long.jsonl: no validation chains left \(1 held out by --val-frac 0.2, 1 of them longer than "
        r"--max-len 300 tokens\); raise --max-len or --val-frac, or give --val-frac 0", chains_with_a_long_validation_chain),
]


def files(d) -> dict:
    """Every path under d -> (bytes, mtime) for a file, None for a folder."""
    out = {}
    for root, dirs, names in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), d)] = None
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, d)] = (open(path, "rb").read(), os.stat(path).st_mtime_ns)
    return out


@pytest.mark.parametrize("argv,message,prepare,created,then", ROWS)
def test_a_fault_is_one_line_and_loses_nothing(here, monkeypatch, argv, message, prepare, created, then):
    d = here
    if prepare:
        prepare(d, monkeypatch)
    before = files(d)
    with pytest.raises(SystemExit) as exit:
        run_main(argv)
    text = exit.value.code
    assert isinstance(text, str) and "\n" not in text, text  # sys.exit(str): exit status 1
    assert re.match("error: " + message, text), text
    after = files(d)
    assert {k: after.get(k) for k in before} == before  # every file that was there, as it was
    assert sorted(after.keys() - before.keys()) == sorted(created)  # no empty --out folder, no adapters
    if then:
        then(d)


def test_a_loss_stuck_at_ln_vocab_is_a_warning(here, capsys):
    """--lr 1e9 saturates the tiny model: from iteration 2 the loss is ln(270) with no gradient."""
    run_main(TRAIN + ["--out", "stuck", "--lr", "1e9", "--batch-size", "1", "--micro-batch", "1", "--val-frac", "0",
                      "--max-iters", "22", "--save-every", "100"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"warning: iterations 2-21: the loss sits at ln(vocab) = {math.log(270):.2f} with no gradient: "
                        "the model predicts a uniform distribution and learns nothing (too high a --lr?)"]


def test_resume_drops_a_half_written_last_record(here, capsys):
    """A crash while appending the record of an iteration after the checkpoint's leaves half a line:
    --resume drops it with a note."""
    log = (here / "run" / "metrics.jsonl").read_text()
    (here / "run" / "metrics.jsonl").write_text(log + '{"iter": 3, "epoch": 1.')
    run_main(TRAIN + ["--out", "run", "--resume", "--max-iters", "3"])  # the run had 2: extend it by one
    lines = (here / "run" / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert "".join(lines[:-1]) == log and json.loads(lines[-1])["iter"] == 3
    assert "note: run/metrics.jsonl:4: dropped a half-written last record" in capsys.readouterr().err


def test_overwrite_replaces_a_run(here):
    (here / "run" / "adapters.safetensors").write_bytes(b"old")
    run_main(TRAIN + ["--out", "run", "--overwrite", "--max-iters", "1"])
    assert [json.loads(line)["iter"] for line in open(here / "run" / "metrics.jsonl")] == [0, 1]
    assert (here / "run" / "adapters.safetensors").read_bytes() != b"old"


def test_a_failed_write_leaves_the_old_adapters(here, monkeypatch):
    """Adapters (and checkpoints) are written to a temporary file and renamed over the old one."""
    path, old = here / "run" / "adapters.safetensors", (here / "run" / "adapters.safetensors").read_bytes()

    def disk_full(tensors, filename, metadata):
        open(filename, "wb").write(b"half a fi")
        raise OSError("No space left on device")
    monkeypatch.setattr(mote, "save_file", disk_full)
    model = mote.load_adapters(Transformer.from_pretrained("tiny.safetensors"), str(path))
    with pytest.raises(OSError, match="No space left"):
        mote.save_adapters(model, str(path))
    assert path.read_bytes() == old


def test_evaluate_checks_its_out_folder_before_generating(tmp_path):
    """A --out that cannot be a folder is one line before the model loads (the evaluation is not lost
    at its end): here the base does not exist either, and the --out error comes first."""
    import evaluate
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--base", str(tmp_path / "none.safetensors"), "--sets", "dev-benign", "--limit", "1",
                       "--out", str(tmp_path / "a_file" / "eval")])
    assert str(e.value.code).startswith(f"error: --out {tmp_path / 'a_file' / 'eval'}: ") and "\n" not in str(e.value.code)
