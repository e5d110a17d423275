"""bench.py runs to its end: every row of the CPU and GPU paths, on tiny shapes, on the CPU (the HF +
PEFT anchor rows too when transformers and peft are installed). Speed targets live in bench.py, not here."""
import math

import bench


def test_every_bench_path_runs_on_tiny_shapes():
    bench.ROWS.clear()
    bench.bench_training("tiny", 2, 32, "cpu", 1, checkpointing=True, dtype_name="float32")
    bench.bench_training("tiny", 2, 32, "cpu", 1, dtype_name="bfloat16")
    bench.bench_decoding("tiny", "cpu", 1, 8, dtype_name="bfloat16")
    bench.bench_per_token("tiny", "cpu", n_tokens=60, window=5)
    names = [r[0] for r in bench.ROWS]
    assert all(math.isfinite(r[1]) and r[1] > 0 for r in bench.ROWS)
    for expected in ("train tiny fp32 mote", "train tiny bf16 mote", "MoTE / single LoRA",
                     "decode tiny bf16 KV cache, batch 1", "first call",
                     "with experts (merged per step)", "per-token time"):
        assert any(expected in n for n in names), expected
