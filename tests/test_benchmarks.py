"""The benchmark scripts run (their numbers are measured by running them, not here)."""
import argparse
import importlib.util
import os

import torch

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name):
    """The script ``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(_BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scale_case(device, iters=3):
    """One small case of ``scale_bench.py`` in process (which sets one thread; restored after)."""
    threads = torch.get_num_threads()
    try:
        return load_benchmark("scale_bench").run_case(argparse.Namespace(
            n=2000, m=4, memory=5, dtype="float64", samples=32, iters=iters, skip=2, repeats=1, threads=1,
            device=device))
    finally:
        torch.set_num_threads(threads)


def test_scale_benchmark_case_reports_paired_ratios():
    """The ratios are paired sums over the timed iterations: an iteration calls the closure at least once, so it
    costs at least the floor's closure call and the ratio per call is above 1 with the optimizer's own time on top;
    no device memory is reported on the CPU."""
    r = scale_case("cpu")
    assert r["iters"] == 3 and r["evals"] >= 1 and r["own"] > 0
    assert r["ratio_eval"] > 1 and r["ratio_it"] >= r["ratio_eval"]
    assert r["device_peak"] is None and r["rss_peak"] >= r["rss_data"] > 0
