"""benchmarks/gpu_throughput.py end to end on the CPU (its --tiny preset): both sides train, and the
JSON holds what the README's GPU table reads. The CPU figures check the code path, not the speed."""
import importlib.util
import json
import sys

from tests.conftest import ROOT


def _benchmark():
    spec = importlib.util.spec_from_file_location("gpu_throughput", ROOT / "benchmarks" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_preset_times_both_sides_of_both_models(tmp_path, one_thread):
    out = tmp_path / "gpu.json"
    returned = _benchmark().main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                                  "--peak-tflops", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["precision"] == "fp32" and report["compile"] is False and report["peak_tflops"] == 1.0
    assert "6*N" in report["flop_formula"]
    for kind, cls in (("gpt", "GPT2LMHeadModel"), ("bert", "BertForMaskedLM")):
        entry = report["results"][kind]
        assert entry["flops_per_token"] > 0
        assert entry["transformers"]["class"] == cls
        for side in ("ours", "transformers"):
            r = entry[side]
            assert r["tokens_per_s"] > 0 and r["params"] > 0
            assert 0 < r["mfu"] < 1  # 1 TFLOP/s given as the peak: a tiny model on a CPU is far below it
            assert r["mfu"] == entry["flops_per_token"] * r["tokens_per_s"] / 1e12
            assert r["peak_memory_mb"] is None  # CUDA's allocator statistics only
        assert entry["ratio"]["tokens_per_s"] == entry["ours"]["tokens_per_s"] / entry["transformers"]["tokens_per_s"]
        assert entry["ours"]["params"] == entry["transformers"]["params"]  # the same model, two implementations


def test_without_transformers_or_a_known_peak_it_times_this_project_alone(monkeypatch, capsys, one_thread):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a machine without it: the import fails
    report = _benchmark().main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--models", "gpt"])
    assert "transformers is not installed here" in capsys.readouterr().out
    assert report["transformers"] is None and report["peak_tflops"] is None
    assert list(report["results"]["gpt"]) == ["flops_per_token", "ours"]
    assert report["results"]["gpt"]["ours"]["mfu"] is None and report["results"]["gpt"]["ours"]["tokens_per_s"] > 0
