"""torchrun --nproc_per_node 2 train.py: two CPU processes (gloo) train the same run as one process.
Each rank takes every second chain of an iteration, the learned-token count and the gradients are
summed over the ranks, rank 0 alone writes: after a few iterations the adapters equal (to float
summation order) those of a one-process run. A world size that does not divide the batch is one line."""
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


def torchrun(n, *args):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29533", "train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


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
