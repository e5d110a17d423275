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


def test_decoding_rows_use_the_experts_as_sample_py_loads_them(monkeypatch):
    """The routed and merged rows time the experts in the base's dtype (mote.cast_experts, as
    sample.load does), not fp32 experts cast again at every token under a bf16 base."""
    seen, real = [], bench.generate

    def spy(model, *a, **kw):
        if kw.get("experts"):
            seen.append({p.dtype for p in model.parameters()})
        return real(model, *a, **kw)

    monkeypatch.setattr(bench, "generate", spy)
    bench.bench_decoding("tiny", "cpu", 1, 4, dtype_name="bfloat16")
    bench.bench_per_token("tiny", "cpu", n_tokens=30, window=3)  # auto: bf16 on a CPU with native bf16
    assert len(seen) >= 3 and all(len(dtypes) == 1 for dtypes in seen), seen
