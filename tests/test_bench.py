"""experiments/bench.py in its smoke mode: it runs and writes the promised keys (no timing)."""

import importlib.util
import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_compile_env() -> dict:
    """The environment with LLVM's optimisation level 0 for XLA:CPU, for the scripts below.

    Their runs are nearly all XLA compilation of a dozen train steps, of which level 0 saves
    about a third. The scripts run the same code, and nothing asserted here depends on the
    level: XLA's FLOP counts and memory analyses are of the HLO, before LLVM (every variant's
    were identical at both levels), and no timing is read.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0"
    return {**os.environ, "XLA_FLAGS": flags.strip()}


# scale_sim's arguments for the tiny model's step, unrolled: one compile per process.
TINY_SIM = ["--model", "tiny", "--devices", "1", "--batch", "2", "--seq", "16", "--scan", "off"]


def run_experiment(script: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``experiments/<script>`` with ``args`` (at LLVM -O0) and requires it to succeed."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=quick_compile_env(),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def load_experiment(name: str):
    """The module of ``experiments/<name>.py``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def run_bench(*args: str) -> subprocess.CompletedProcess:
    """experiments/bench.py with ``args``, in the quick-compile environment."""
    cmd = [sys.executable, str(ROOT / "experiments" / "bench.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=quick_compile_env())


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    vs_peft = bool(importlib.util.find_spec("peft") and importlib.util.find_spec("torch"))
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "bench.py"),
            "--smoke",
            "--json",
            str(out),
            "--md",
            str(tmp_path / "bench.md"),
        ]
        + (["--vs-peft"] if vs_peft else []),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=quick_compile_env(),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    for key in (  # the keys issue 6 promises, and the extras the docs quote
        "device",
        "floor_s",
        "aroma_r1_s",
        "aroma_r1_merged4_s",
        "aroma_r1_merged16_s",
        "aroma_r8_s",
        "lora_r1_s",
        "lora_r8_s",
        "dora_r8_s",
        "adalora_r8_s",
        "outer_step_s",
        "train_step_compiles",
        "compile_s",
        "peak_memory_bytes",
        "optimizer_state_bytes",
        "optimizer_state_bytes_aroma_r1",
        "paired_ratios_to_floor",
        "floor_mfu",
    ):
        assert key in data
    assert data["paired_ratios_to_floor"]["floor"] == 1.0
    # The analytic model FLOPs (MFU's numerator) agree with XLA's own count of the floor step.
    assert abs(data["floor_model_flops"] / data["floor_xla_flops"] - 1) < 0.05
    # Adam holds two moments per trainable parameter (plus scalars): r=8 holds 8x r=1's.
    opt, n = data["optimizer_state_bytes"], data["trainable_params"]
    assert opt["aroma_r1"] >= 2 * 4 * n["aroma_r1"] and opt["aroma_r1"] < 2.1 * 4 * n["aroma_r1"]
    assert n["aroma_r8"] == 8 * n["aroma_r1"]
    # Each variant's memory analysis; the factors variant holds the frozen factors as well.
    mem = {k: v["memory_bytes"]["argument"] for k, v in data["compile_stats"].items()}
    assert mem["aroma_r1_merged16_factors"] > mem["lora_r1"]
    if vs_peft:
        assert {"torch_floor_s", "peft_lora_r1_s", "peft_lora_r8_s"} <= set(data)
        assert data["trainable_params"]["peft_lora_r8"] == data["trainable_params"]["lora_r8"]
    assert all(v == 1 for v in data["train_step_compiles"].values())
    assert "| floor |" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_bench_smoke_llama_shape(tmp_path):
    """The LLaMA path (HF's Flax LLaMA with our fixes; PyTorch LlamaForCausalLM with --vs-peft)."""
    out = tmp_path / "bench.json"
    vs_peft = bool(importlib.util.find_spec("peft") and importlib.util.find_spec("torch"))
    cmd = [sys.executable, str(ROOT / "experiments" / "bench.py"), "--smoke", "--json", str(out)]
    cmd += ["--model", "tiny-llama", "--variants", "lora_r1"] + (["--vs-peft"] if vs_peft else [])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=quick_compile_env())
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["model"] == "tiny-llama" and data["target_modules"] == 10  # q, k, v, up, down x 2
    assert set(data["variants"]) >= {"aroma_r1", "lora_r1", "floor"}
    assert abs(data["floor_model_flops"] / data["floor_xla_flops"] - 1) < 0.05
    if vs_peft:
        n = data["trainable_params"]
        assert n["peft_lora_r1"] == n["lora_r1"]
        # The torch floor: one zero bias per target output feature, as ours: per layer
        # q 64 + k 32 + v 32 (2 of 4 heads) + up 128 + down 64, two layers.
        assert n["torch_floor"] == 2 * (64 + 32 + 32 + 128 + 64)


def test_bench_input_wait_smoke(tmp_path):
    """--input-wait: both pipeline modes run through BatchStream and report a wait share."""
    out = tmp_path / "wait.json"
    res = run_bench("--input-wait", "--smoke", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["input_wait"]) == {"no_prefetch", "prefetch"}
    for v in data["input_wait"].values():
        assert 0 < v["input_wait_share"] < 1 and v["step_s"] > 0
    assert "share of step time waiting for input" in res.stdout


@pytest.mark.slow
def test_compile_breakdown_runs():
    res = run_experiment("compile_breakdown.py", "--model", "tiny")
    for name in ("train step (aroma)", "train step (lora)", "prune reset", "inner check"):
        assert name in res.stdout


def test_xla_phases_reads_only_the_first_train_step_compile():
    log = "\n".join(
        [
            "I1 hlo_pass_pipeline.cc:176] HLO pass: dce time: 1 ms (1000 us) (cumulative",
            "I1 cpu_compiler.cc:2094] Compiling [jit_other] for CPU using JIT time: 1 s (7 us)",
            "I1 hlo_pass_pipeline.cc:176] HLO pass: copy-insertion time: 2 ms (2000 us) (cum",
            "I1 hlo_pass_pipeline.cc:176] HLO pass: copy-insertion time: 3 ms (3000 us) (cum",
            "I1 cpu_compiler.cc:1269] Running HLO passes on [jit__step_impl] for CPU time: "
            "5 ms (5000 us) (cumulative",
            "I1 fusion_compiler.cc:494] Compiled LLVM module: __compute_module_and_select_"
            "fusion.3_kernel_module time: 9 ms (9000 us) (cumulative",
            "I1 fusion_compiler.cc:494] Compiled LLVM module: __compute_module_dot.31_elemental"
            "_kernel_module time: 9 ms (9000 us) (cumulative",
            "I1 thunk_emitter.cc:856] Reusing kernel: a for fusion: b",
            "I1 cpu_compiler.cc:2094] Compiling [jit__step_impl] for CPU using JIT time: "
            "2 s (2000000 us) (cumulative",
            # A later compile (scale_sim's unrolled FLOP steps): ignored.
            "I1 hlo_pass_pipeline.cc:176] HLO pass: copy-insertion time: 9 s (9000000 us) (c",
            "I1 cpu_compiler.cc:1269] Running HLO passes on [jit__step_impl] for CPU time: "
            "9 s (9000000 us) (cumulative",
            "I1 fusion_compiler.cc:494] Compiled LLVM module: __compute_module_x_kernel_module "
            "time: 9 ms (9000 us) (cumulative",
            "I1 thunk_emitter.cc:856] Reusing kernel: c for fusion: d",
        ]
    )
    r = load_experiment("xla_phases").parse(log)
    assert r["hlo_pass_s"] == 0.005 and r["jit_s"] == 2.0
    assert r["top_passes_s"] == {"copy-insertion": 0.005}  # not the other jit's dce
    assert r["kernels"] == 2 and r["reused"] == 1
    assert r["kernel_families"] == {"and_select_fusion": 1, "dot_elemental": 1}


@pytest.mark.slow
def test_xla_phases_on_a_tiny_step(tmp_path):
    out = tmp_path / "phases.json"
    run_experiment("xla_phases.py", "--repeats", "1", "--out", str(out), "--", *TINY_SIM)
    m = json.loads(out.read_text())["methods"]
    # The controller adds kernels to LoRA's step; both programs compiled real kernels.
    assert m["aroma"]["kernels"] > m["lora"]["kernels"] > 50
    assert m["aroma"]["hlo_pass_s_median"] > 0 and m["lora"]["jit_s_median"] > 0


@pytest.mark.slow
def test_generate_speed_runs(tmp_path):
    out = tmp_path / "gen.json"
    args = ["--model", "tiny", "--batch", "2", "--prompt", "8", "--new", "3", "--repeats", "1"]
    run_experiment("generate_speed.py", *args, "--out", str(out))
    got = json.loads(out.read_text())
    assert got["new_tokens"] == 3 and got["cache"]["tokens_per_s"] > 0
    assert got["speedup"] == got["no_cache"]["seconds_median"] / got["cache"]["seconds_median"]


def test_compile_ratio_summary_divides_the_first_method_by_the_second():
    runs = {
        "aroma": [
            {"compile_cpu_s": c, "compile_s": w} for c, w in ((9.0, 6.0), (7.0, 5.0), (8.0, 4.0))
        ],
        "lora": [
            {"compile_cpu_s": c, "compile_s": w} for c, w in ((5.0, 4.0), (6.0, 2.0), (4.0, 3.0))
        ],
    }
    s = load_experiment("compile_ratio").summarise(runs)
    assert s["methods"]["aroma"]["compile_cpu_s_median"] == 8.0
    assert s["methods"]["lora"]["compile_s_min"] == 2.0
    assert s["ratio"] == {
        "compile_cpu_s_median": 1.6,  # 8 / 5
        "compile_cpu_s_min": 1.75,  # 7 / 4
        "compile_s_median": round(5 / 3, 3),
        "compile_s_min": 2.0,  # 4 / 2
    }
    # per repeat (compiled back to back): 9/5, 7/6, 8/4; median 1.8
    assert s["paired_ratio"] == {
        "compile_cpu_s": [1.8, 1.167, 2.0],
        "compile_cpu_s_median": 1.8,
        "compile_cpu_s_median_ci": None,  # 3 repeats bound no 90% interval
    }


def test_median_interval_is_the_binomial_order_statistic_interval():
    mi = load_experiment("compile_ratio").median_interval
    # n = 10: [x_(2), x_(9)] covers 1 - 2 * 11/1024 = 97.85%; [x_(3), x_(8)] only 89%.
    xs = [3.0, 9.0, 1.0, 7.0, 5.0, 2.0, 8.0, 4.0, 10.0, 6.0]
    assert mi(xs) == {"low": 2.0, "high": 9.0, "coverage": 0.9785, "n": 10}
    assert mi(xs, level=0.85) == {"low": 3.0, "high": 8.0, "coverage": 0.8906, "n": 10}
    # n = 5: only the whole range, 1 - 2/32 = 93.75%; n = 4 (87.5% at most): none at 90%.
    assert mi([5.0, 1.0, 4.0, 2.0, 3.0]) == {"low": 1.0, "high": 5.0, "coverage": 0.9375, "n": 5}
    assert mi([1.0, 2.0, 3.0, 4.0]) is None
    # The coverage, by enumeration: each draw falls below the true median with probability 1/2,
    # and [x_(k), x_(n+1-k)] holds it when at least k fall below and at least k above.
    n = 12
    got = mi([float(i) for i in range(n)])
    k = int(got["low"]) + 1
    hits = sum(
        1 for pattern in product((0, 1), repeat=n) if sum(pattern) >= k and n - sum(pattern) >= k
    )
    assert got["coverage"] == round(hits / 2**n, 4) >= 0.9
    # one order statistic further in would fall below 90%
    inner = sum(1 for p in product((0, 1), repeat=n) if min(sum(p), n - sum(p)) >= k + 1)
    assert inner / 2**n < 0.9


def test_compile_ratio_pools_earlier_results(tmp_path, capsys):
    cr = load_experiment("compile_ratio")
    run = lambda c: {"compile_cpu_s": c, "compile_s": c}  # noqa: E731
    first = {"aroma": [run(9.0)], "lora": [run(3.0)], "aroma@baseline": [run(10.0)]}
    second = {"aroma": [run(4.0), run(5.0)], "lora": [run(4.0), run(1.0)]}
    second["aroma@baseline"] = [run(8.0), run(6.0)]
    files = []
    for i, runs in enumerate((first, second)):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(
            json.dumps(
                {"scale_sim_args": ["--layers", "2"], **cr.summarise(runs, "aroma@baseline")}
            )
        )
    out = tmp_path / "pooled.json"
    got = cr.main(["--pool", *map(str, files), "--out", str(out)])
    assert json.loads(out.read_text()) == got
    assert got["methods"]["aroma"]["compile_cpu_s_median"] == 5.0  # of 9, 4, 5
    assert got["ratio"]["compile_cpu_s_median"] == round(5.0 / 3.0, 3)  # lora: 3, 4, 1
    assert got["paired_ratio"]["compile_cpu_s"] == [3.0, 1.0, 5.0]
    assert got["paired_versus_baseline"]["compile_cpu_s_median"] == round(5 / 6, 3)
    assert "per repeat" in capsys.readouterr().out
    files[1].write_text(json.dumps({"scale_sim_args": ["--layers", "32"], **cr.summarise(second)}))
    with pytest.raises(SystemExit):
        cr.main(["--pool", *map(str, files)])
    assert "accepted: the same as" in capsys.readouterr().err


def test_compile_ratio_pools_chosen_series_of_one_program_across_scripts(tmp_path, capsys):
    cr = load_experiment("compile_ratio")
    size = {"instructions": 70, "fusions": 7, "outer_branch_fusions": 2}
    run = lambda c, **kw: {"compile_cpu_s": c, "compile_s": c, **size, **kw}  # noqa: E731
    ratio = {"scale_sim_args": ["--layers", "2"], "methods": {}}
    ratio["methods"] = {"aroma": {"runs": [run(6.0)]}, "lora": {"runs": [run(4.0)]}}
    ablation = {"scale_sim_args": ["--layers", "2"], "series": {}}  # compile_ablation's layout
    ablation["series"] = {
        "aroma": {"runs": [run(9.0), run(5.0)]},
        "lora": {"runs": [run(6.0), run(5.0)]},
        "aroma/no-outer-step": {"runs": [run(4.0), run(4.0)]},
    }
    files = [tmp_path / "ratio.json", tmp_path / "ablation.json"]
    for f, r in zip(files, (ratio, ablation), strict=True):
        f.write_text(json.dumps(r))
    got = cr.main(["--pool", *map(str, files), "--series", "aroma,lora"])
    assert list(got["methods"]) == ["aroma", "lora"]
    assert got["paired_ratio"]["compile_cpu_s"] == [1.5, 1.5, 1.0]
    # without --series the files' series must be the same
    with pytest.raises(SystemExit):
        cr.main(["--pool", *map(str, files)])
    assert "accepted: the same as" in capsys.readouterr().err
    # another program (a different size) under the same name is refused
    ablation["series"]["lora"]["runs"][1]["instructions"] = 71
    files[1].write_text(json.dumps(ablation))
    with pytest.raises(SystemExit):
        cr.main(["--pool", *map(str, files), "--series", "aroma,lora"])
    assert "size differed between runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cr.main(["--series", "aroma,lora", "--", "--layers", "2"])
    assert "--series selects what --pool pools" in capsys.readouterr().err


def test_compile_ratio_program_sizes_are_exact_and_divided():
    cr = load_experiment("compile_ratio")
    size = lambda n: {"instructions": n, "fusions": n // 10, "outer_branch_fusions": 0}  # noqa: E731
    runs = {
        "aroma": [{"compile_cpu_s": 2.0, "compile_s": 1.0, **size(300)} for _ in range(2)],
        "lora": [{"compile_cpu_s": 1.0, "compile_s": 1.0, **size(200)} for _ in range(2)],
    }
    s = cr.summarise(runs)
    assert s["methods"]["aroma"]["program"] == size(300)
    assert s["program_ratio"] == {"instructions": 1.5, "fusions": 1.5, "outer_branch_fusions": 1.0}
    for r in runs["aroma"]:
        r["outer_branch_fusions"] = 7  # a branch LoRA lacks: no ratio, rather than a made-up one
    assert cr.summarise(runs)["program_ratio"]["outer_branch_fusions"] is None
    runs["lora"][1]["instructions"] = 201  # one program per series, or the runs disagree
    with pytest.raises(RuntimeError, match="differed between runs"):
        cr.summarise(runs)
    hlo = """HloModule m

%fused (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %n = f32[2]{0} negate(%p)
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  ROOT %f = f32[2]{0} fusion(%x), kind=kLoop, calls=%fused
}
"""
    assert cr.program_size(hlo) == {
        "instructions": 4,
        "fusions": 1,
        "outer_branch_fusions": 0,
        "loop_body_fusions": [],
        "threefry_fusions": 0,
        "outer_branch_threefry_fusions": 0,
    }


def test_compile_ratio_counts_the_threefry_copies_compiled():
    """A draw XLA inlined into two consumers of a branch is two hashing fusions there."""
    cr = load_experiment("compile_ratio")
    n = cr.THREEFRY_XORS

    def fused(name: str, xors: int) -> str:
        body = "\n".join(f"  %x{i} = u32[4]{{0}} xor(%p, %p)" for i in range(xors))
        return f"%{name} (p: u32[4]) -> u32[4] {{\n  %p = u32[4]{{0}} parameter(0)\n{body}\n}}\n"

    hlo = "\n".join(
        [
            "HloModule m",
            fused("hash", n),
            fused("mix", n - 1),  # a few xors (a mask's arithmetic) is no hash
            "%outer (q: u32[4]) -> u32[4] {",
            "  %q = u32[4]{0} parameter(0)",
            "  %h1 = u32[4]{0} fusion(%q), kind=kLoop, calls=%hash",
            "  %h2 = u32[4]{0} fusion(%h1), kind=kLoop, calls=%hash",
            "  ROOT %m = u32[4]{0} fusion(%h2), kind=kLoop, calls=%mix",
            "}",
            "%skip (q: u32[4]) -> u32[4] {",
            "  ROOT %q = u32[4]{0} parameter(0)",
            "}",
            "ENTRY %main (x: u32[4], c: pred[]) -> u32[4] {",
            "  %x = u32[4]{0} parameter(0)",
            "  %c = pred[]{0} parameter(1)",
            "  %k = u32[4]{0} fusion(%x), kind=kLoop, calls=%hash",
            "  ROOT %o = u32[4]{0} conditional(%c, %k, %k), branch_computations={%skip, %outer}",
            "}",
        ]
    )
    assert cr.threefry_fusions(hlo) == {"total": 3, "branches": [0, 2]}
    size = cr.program_size(hlo)
    assert size["threefry_fusions"] == 3 and size["outer_branch_threefry_fusions"] == 2


def test_compile_ratio_against_a_baseline_checkout():
    series = {  # CPU seconds only; wall seconds equal them here
        "aroma": [9.0, 7.0, 8.0],
        "lora": [5.0, 6.0, 4.0],
        "aroma@baseline": [12.0, 10.0, 11.0],
    }
    runs = {m: [{"compile_cpu_s": x, "compile_s": x} for x in xs] for m, xs in series.items()}
    s = load_experiment("compile_ratio").summarise(runs, baseline="aroma@baseline")
    assert s["ratio"]["compile_cpu_s_median"] == 1.6  # 8 / 5: the baseline left out
    assert s["versus_baseline"]["compile_cpu_s_median"] == round(8 / 11, 3)
    assert s["versus_baseline"]["compile_s_min"] == 0.7  # 7 / 10
    assert s["baseline_ratio"]["compile_cpu_s_min"] == 2.5  # 10 / 4


def test_compile_ratio_rejects_a_baseline_without_the_script(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "compile_ratio.py"),
            "--baseline",
            str(tmp_path),
            "--",
            *TINY_SIM,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2
    assert "no aroma_jax package there" in res.stderr and "d7920e0" in res.stderr


def test_compile_ratio_names_what_a_baseline_checkout_lacks(tmp_path):
    cr = load_experiment("compile_ratio")
    assert cr.baseline_problem(ROOT) is None  # this checkout can be its own baseline
    (tmp_path / "aroma_jax").mkdir()
    (tmp_path / "aroma_jax" / "__init__.py").write_text("")
    assert cr.baseline_problem(tmp_path) == "no experiments/scale_sim.py there"
    (tmp_path / "experiments").mkdir()
    # scale_sim.py from before d7920e0: it compiled inside simulate(), with no compile_step
    (tmp_path / "experiments" / "scale_sim.py").write_text("def simulate(args):\n    pass\n")
    assert cr.baseline_problem(tmp_path) == "its experiments/scale_sim.py has no compile_step"


@pytest.mark.slow
def test_compile_ratio_on_a_tiny_step(tmp_path):
    out = tmp_path / "ratio.json"
    # this checkout as its own baseline: the baseline path end to end
    run_experiment(
        "compile_ratio.py",
        "--repeats",
        "1",
        "--out",
        str(out),
        "--baseline",
        str(ROOT),
        "--",
        *TINY_SIM,
    )
    r = json.loads(out.read_text())
    assert r["baseline"] == str(ROOT) and set(r["versus_baseline"]) == set(r["ratio"])
    runs = {m: r["methods"][m]["runs"] for m in ("aroma", "lora", "aroma@baseline")}
    # the same code as its own baseline: the same program, counted exactly
    assert r["methods"]["aroma"]["program"] == r["methods"]["aroma@baseline"]["program"]
    assert set(r["program_versus_baseline"].values()) == {1.0}
    aroma, lora = r["methods"]["aroma"]["program"], r["methods"]["lora"]["program"]
    assert aroma["outer_branch_fusions"] > 0 and lora["outer_branch_fusions"] == 0
    assert aroma["instructions"] > lora["instructions"] > aroma["fusions"]
    assert all(len(v) == 1 and v[0]["compile_cpu_s"] > 0 for v in runs.values())
    assert runs["aroma"][0]["target"] == "simulated CPU devices" and runs["lora"][0]["layers"] == 2
    assert set(r["ratio"]) == {
        "compile_cpu_s_median",
        "compile_cpu_s_min",
        "compile_s_median",
        "compile_s_min",
    }


@pytest.mark.slow
def test_compile_ablation_removes_the_part_it_names(tmp_path):
    out = tmp_path / "ablation.json"
    run_experiment(
        "compile_ablation.py",
        "--repeats",
        "1",
        "--ablations",
        "no-outer-step,outer-step-alone+no-eq6-base-norm",
        "--out",
        str(out),
        "--",
        *TINY_SIM,
    )
    s = json.loads(out.read_text())["series"]
    alone = "aroma/outer-step-alone+no-eq6-base-norm"
    assert list(s) == ["aroma", "lora", "aroma/no-outer-step", alone]
    full, lora = s["aroma"]["program"], s["lora"]["program"]
    assert full["outer_branch_fusions"] > 0 and lora["outer_branch_fusions"] == 0
    # no outer step: the branch is gone, the rest of the AROMA step stays (more than LoRA's)
    gone = s["aroma/no-outer-step"]["program"]
    assert gone["outer_branch_fusions"] == 0
    assert lora["instructions"] < gone["instructions"] < full["instructions"]
    # the outer step alone (here without eq. 6's base norm): its branch, no forward or backward
    assert 0 < s[alone]["program"]["outer_branch_fusions"] < full["outer_branch_fusions"]
    assert s[alone]["program"]["instructions"] < gone["instructions"]
    for name, rec in s.items():
        assert rec["repeats"] == 1 and rec["compile_cpu_s_median"] > 0
        if name != "aroma":
            assert rec["per_repeat_over_aroma"] == round(
                rec["runs"][0]["compile_cpu_s"] / s["aroma"]["runs"][0]["compile_cpu_s"], 3
            )


@pytest.mark.parametrize("script", ["compile_ratio", "compile_ablation"])
def test_compile_scripts_share_their_argument_checks(script, capsys):
    main = load_experiment(script).main
    for argv, says in (
        (["--repeats", "0", "--", "--layers", "2"], "--repeats 0: accepted a positive integer"),
        (["--", "--layers", "2", "--method", "lora"], "no --method after it"),
        (["--", "--out", "x.json"], "pass --out before --"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "processes per" in capsys.readouterr().out


def test_compile_ablation_rejects_an_unknown_ablation():
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "compile_ablation.py"),
            "--ablations",
            "no-outer-step,no-forward,outer-step-alone+no-eq6-base-norm+no-backward",
            "--",
            *TINY_SIM,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2
    unknown = "unknown ['no-forward', 'outer-step-alone+no-eq6-base-norm+no-backward']"
    assert unknown in res.stderr and "no-optimizer-reset" in res.stderr


@pytest.mark.slow
def test_trace_run_saves_every_leaf_and_compares_bit_for_bit(tmp_path):
    import numpy as np

    out = tmp_path / "now.npz"
    args = ("--configs", "scan-bf16-prune", "--steps", "6", "--out", str(out))
    res = run_experiment("trace_run.py", *args)
    assert f"aroma_jax from {ROOT / 'aroma_jax'}" in res.stdout
    saved = dict(np.load(out))
    assert saved["scan-bf16-prune/steps/merged"].sum() > 0  # outer steps ran: the trace has teeth
    assert saved["scan-bf16-prune/steps/loss"].shape == (6,)
    assert any(".opt_state" in k for k in saved) and any(".ctrl.key" in k for k in saved)
    tr = load_experiment("trace_run")
    assert tr.compare(saved, dict(saved)) == []
    changed = dict(saved)
    key = next(k for k in saved if k.endswith(".adapters.frozen['model/layers/mlp/up_proj'].a"))
    changed[key] = saved[key].copy()
    changed[key].flat[0] = np.nextafter(changed[key].flat[0], np.float32(np.inf))  # one ulp
    del changed["scan-bf16-prune/steps/loss"]
    problems = tr.compare(saved, changed)
    assert problems[0] == "scan-bf16-prune/steps/loss: only in the first"
    assert problems[1].startswith(key + ": differs")
    assert len(problems) == 2
    script = str(ROOT / "experiments" / "trace_run.py")
    res = subprocess.run(
        [sys.executable, script, "--compare", str(out), str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and ": 0 differ" in res.stdout
