"""torchrun --nproc_per_node 2 on CPU (gloo): two processes do what one does (parallel.py).
train.py: each rank takes every second chain of an iteration, the learned-token count and the
gradients are summed over the ranks, rank 0 alone writes: after a few iterations the adapters equal
(to float summation order) those of a one-process run. A world size that does not divide the batch
is one line. evaluate.py and selfgen.py: each rank answers every second prompt, and rank 0 writes
exactly the file one process writes."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAINS = [{"question": f"question {i}?", "analysis": "think " * (i % 4), "guidance": "g" * (i % 3 + 1),
           "response": f"response number {i}"} for i in range(16)]


def torchrun(n, *args, script="train.py"):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29533", script, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def one_process(script, *args):
    run = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_two_processes_train_what_one_does(tmp_path):
    torch.manual_seed(0)
    Transformer(ModelArgs.preset("tiny")).save(str(tmp_path / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    (tmp_path / "chains.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHAINS))
    flags = ["--base", str(tmp_path / "tiny.safetensors"), "--data", str(tmp_path / "chains.jsonl"), "--max-iters", "3",
             "--batch-size", "8", "--micro-batch", "2", "--lr", "1e-2", "--val-frac", "0", "--dtype", "float32"]
    one = subprocess.run([sys.executable, "train.py", *flags, "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *flags, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "adapters.safetensors"), load_file(tmp_path / "two" / "adapters.safetensors")
    assert a.keys() == b.keys()
    logs = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")]
    assert [r["iter"] for r in logs[1]] == [1, 2, 3]  # one log, written by rank 0
    for one, two in zip(*logs):  # the same loss and gradient at every iteration, to float summation order
        assert (two["loss"], two["grad_norm"]) == pytest.approx((one["loss"], one["grad_norm"]), rel=1e-5)
    for k in a:  # Adam divides by sqrt(v): where a gradient is ~0 its rounding moves the step by up to ~1e-5
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)


def test_a_world_size_that_does_not_divide_the_batch_is_one_line(tmp_path):
    torch.manual_seed(0)
    Transformer(ModelArgs.preset("tiny")).save(str(tmp_path / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    (tmp_path / "chains.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHAINS))
    run = torchrun(2, "--base", str(tmp_path / "tiny.safetensors"), "--data", str(tmp_path / "chains.jsonl"),
                   "--batch-size", "7", "--out", str(tmp_path / "odd"))
    assert run.returncode != 0
    assert "error: torchrun: 2 processes do not divide --batch-size 7; give a multiple of 2" in run.stderr
    assert not os.path.exists(tmp_path / "odd")


def test_two_processes_evaluate_and_self_generate_what_one_does(tmp_path):
    """Five prompts over two ranks (3 + 2, interleaved back in order), batched: the same files."""
    torch.manual_seed(0)
    Transformer(ModelArgs.preset("tiny")).save(str(tmp_path / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    (tmp_path / "harmful.txt").write_text("".join(f"How do I hurt thing {i}?\n" for i in range(5)))
    (tmp_path / "benign.txt").write_text("".join(f"How do I bake bread number {i}?\n" * (i + 1) for i in range(4)))
    base = ["--base", str(tmp_path / "tiny.safetensors"), "--dtype", "float32", "--batch-size", "4"]
    flags = [*base, "--sets", f"harmful:{tmp_path}/harmful.txt,benign:{tmp_path}/benign.txt", "--max-new-tokens", "8"]
    one_process("evaluate.py", *flags, "--out", str(tmp_path / "one"))
    two = torchrun(2, *flags, "--out", str(tmp_path / "two"), script="evaluate.py")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "completions.jsonl").read_text() == (tmp_path / "one" / "completions.jsonl").read_text()
    assert json.load(open(tmp_path / "two" / "summary.json")) == json.load(open(tmp_path / "one" / "summary.json"))
    flags = [*base, "--questions", str(tmp_path / "harmful.txt"), "--max-new-tokens", "6", "--temperature", "0.5"]
    one_process("selfgen.py", *flags, "--out", str(tmp_path / "one.jsonl"))
    two = torchrun(2, *flags, "--out", str(tmp_path / "two.jsonl"), script="selfgen.py")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text() != ""
