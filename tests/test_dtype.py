"""--dtype auto (model.choose_dtype): bf16 on CUDA and on a CPU that computes bf16 natively, fp32 on
other CPUs; forced dtypes are obeyed; forced bf16 on a GPU without it is one line naming --dtype float32.
The CPU's capability is monkeypatched, so every branch runs on any machine."""
import pytest
import torch

import model
import sample
import train


@pytest.fixture
def cpu(monkeypatch):
    """Set what this 'CPU' supports: cpu("AMX"), cpu("AVX512-BF16"), cpu("")."""
    def set_features(feature):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: feature == "AMX")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: feature == "AVX512-BF16")
        monkeypatch.setattr(model, "open", lambda *a, **k: iter(["Features\t: fp asimd" + (" bf16" if feature == "ARM BF16" else "")]),
                            raising=False)
    return set_features


@pytest.mark.parametrize("feature", ["AMX", "AVX512-BF16", "ARM BF16"])
def test_auto_is_bf16_on_a_cpu_that_computes_it(cpu, feature):
    cpu(feature)
    dtype, why = model.choose_dtype("auto", "cpu")
    assert dtype == torch.bfloat16 and feature in why


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu):
    cpu("")
    dtype, why = model.choose_dtype("auto", "cpu")
    assert dtype == torch.float32 and "no native bf16" in why


def test_auto_is_bf16_on_cuda_and_forced_dtypes_are_obeyed(cpu, monkeypatch):
    cpu("")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert model.choose_dtype("auto", "cuda")[0] == torch.bfloat16
    assert model.choose_dtype("bfloat16", "cpu")[0] == torch.bfloat16  # emulated, slow, but PyTorch computes it
    cpu("AMX")
    assert model.choose_dtype("float32", "cpu")[0] == torch.float32


def test_forced_bf16_on_a_gpu_without_it_is_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--base", "none.safetensors", "--data", "none.jsonl", "--out", str(out), "--dtype", "bfloat16"])
    assert str(e.value) == "error: this GPU cannot compute bfloat16; use --dtype float32"
    assert not out.exists()


def test_sample_prints_the_choice_and_its_reason_after_loading(cpu, capsys, tmp_path):
    cpu("AVX512-BF16")
    torch.manual_seed(0)
    model.Transformer(model.ModelArgs.preset("tiny")).save(str(tmp_path / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    loaded, _ = sample.load(str(tmp_path / "tiny.safetensors"), None, "cpu")
    assert loaded.dtype == torch.bfloat16
    assert capsys.readouterr().err == "dtype: bfloat16 (auto: this CPU computes bf16 natively (AVX512-BF16))\n"
