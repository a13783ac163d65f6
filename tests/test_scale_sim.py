"""experiments.scale_sim on a tiny config: the same AOT path as the LLaMA-3-8B simulation."""

import json

import jax
import pytest


def load():
    from experiments import scale_sim

    return scale_sim


def test_tiny_step_compiles_from_abstract_shapes_on_a_simulated_mesh(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    sim = load()
    out = tmp_path / "tiny.json"
    # Unrolled: one compile (a scanned step also compiles unrolled 1- and 2-layer steps for its
    # FLOPs; the next test covers that path).
    argv = ["--model", "tiny-llama", "--devices", "8", "--batch", "8", "--seq", "16"]
    argv += ["--scan", "off"]
    (r,) = sim.main(argv + ["--layers", "1", "--out", str(out)])
    assert json.loads(out.read_text())[0]["devices"] == 8
    assert r["mesh"] == "fsdp=8" and r["layers"] == 1 and r["adapted_modules"] == 5
    assert r["argument_bytes"] > 0 and r["temp_bytes"] > 0 and r["flops_per_device"] > 0
    peak = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    assert r["peak_bytes"] == peak
    assert r["alias_bytes"] > 0  # the donated state is reused for the new state
    every = r["collectives"]["every_step"]
    assert every.get("all-gather", {}).get("count", 0) > 0  # fsdp gathers the weights
    assert all(v["bytes"] > 0 for v in every.values())


@pytest.mark.slow
def test_scanned_step_reports_every_layers_flops(tmp_path):
    """XLA counts a scanned layer (a while body) once; the script extrapolates the unrolled
    1- and 2-layer steps instead, which must agree with the unrolled 3-layer step."""
    sim = load()
    argv = ["--model", "tiny-llama", "--devices", "1", "--batch", "2", "--seq", "8"]
    argv += ["--layers", "3"]
    (scanned,) = sim.main(argv)
    (unrolled,) = sim.main(argv + ["--scan", "off"])
    assert scanned["scan_layers"] and not unrolled["scan_layers"]
    assert scanned["adapted_modules"] == unrolled["adapted_modules"] == 15  # one per layer
    assert scanned["flops_scan_body_once"] < 0.8 * unrolled["flops_per_device"]
    assert scanned["flops_per_device"] == pytest.approx(unrolled["flops_per_device"], rel=0.02)


def test_hlo_fusion_counting():
    sim = load()
    hlo = """HloModule m
%fused_a (p: f32[4]) -> f32[4] {
  %m = f32[4]{0} multiply(f32[4]{0} %p, f32[4]{0} %p)
}

%skip (p: f32[4]) -> f32[4] {
  %t = (f32[4]{0}) tuple(f32[4]{0} %p)
}

%outer (p: f32[4]) -> f32[4] {
  %f1 = f32[4]{0} fusion(f32[4]{0} %p), kind=kLoop, calls=%fused_a
  %f2 = f32[4]{0} fusion(f32[4]{0} %f1), kind=kLoop, calls=%fused_a
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond, body=%body
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %f3 = f32[4]{0} fusion(f32[4]{0} %x), kind=kLoop, calls=%fused_a
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

%layers (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %f4 = f32[4]{0} fusion(f32[4]{0} %x), kind=kLoop, calls=%fused_a
  %f5 = f32[4]{0} fusion(f32[4]{0} %f4), kind=kLoop, calls=%fused_a
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %f0 = f32[4]{0} fusion(f32[4]{0} %x), kind=kLoop, calls=%fused_a
  %c = f32[4]{0} conditional(pred[] %q, f32[4]{0} %f0), branch_computations={%skip, %outer}
  %s = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond, body=%layers
}
"""
    # one fusion in the entry, two in the outer branch plus one in its loop, two in the layer
    # loop; the fused computation's multiply is not a fusion of its own; the branch's loop is
    # not one of the step's loop bodies
    assert sim.fusions(hlo) == {
        "total": 6,
        "conditional_branches": [[0, 3]],
        "loop_bodies": [2],
    }


def test_hlo_collective_parsing():
    sim = load()
    hlo = """HloModule m
%branch_a (p: f32[4]) -> f32[4] {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={}
}

ENTRY %main (x: bf16[8,16]) -> bf16[64,16] {
  %ag = bf16[64,16]{1,0} all-gather(bf16[8,16]{1,0} %x), dimensions={0}
  %rs = (f32[2]{0}, f32[3]{0}) reduce-scatter(f32[16]{0} %y, f32[24]{0} %z)
  %c = f32[4]{0} conditional(pred[] %q, f32[4]{0} %p), branch_computations={%branch_a, %b}
}
"""
    got = sim.collectives(hlo)
    assert got["every_step"]["all-gather"] == {"count": 1, "bytes": 64 * 16 * 2}
    assert got["every_step"]["reduce-scatter"] == {"count": 1, "bytes": 20}
    assert got["conditional"] == {"all-reduce": {"count": 1, "bytes": 16}}
    # a scanned layer stack: the loop body's collectives run once per iteration
    looped = """HloModule m
%layer (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ag = bf16[64,16]{1,0} all-gather(bf16[8,16]{1,0} %x), dimensions={0}
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond, body=%layer, \
backend_config={"known_trip_count":{"n":"32"}}
}
""".replace("\\\n", "")
    got = sim.collectives(looped)
    assert got["every_step"]["all-gather"] == {"count": 32, "bytes": 32 * 64 * 16 * 2}
    with pytest.raises(SystemExit):
        sim.parse_args(["--devices", "4"])  # no mesh for 4 devices


def test_hlo_trip_counts_from_the_loop_condition():
    """XLA's TPU pipeline leaves ``known_trip_count`` off its loops: the count then comes from
    the condition's compare of the induction variable with a constant; nested loops multiply,
    a loop inside a controller branch stays conditional, an async collective counts once (at its
    done), and a collective in a computation the body calls runs as often as the body."""
    sim = load()
    hlo = """HloModule m
%gather_w (p: bf16[8,16]) -> bf16[64,16] {
  %ag = bf16[64,16]{1,0} all-gather(bf16[8,16]{1,0} %p), dimensions={0}
}

%inner_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %x), replica_groups={}, to_apply=%add
}

%inner_cond (p: (s32[], f32[4])) -> pred[] {
  %i = s32[] get-tuple-element((s32[], f32[4]) %p), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(s32[] %three, s32[] %i), direction=GT
}

%layer (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ags = (bf16[8,16]{1,0}, bf16[64,16]{1,0}) all-gather-start(bf16[8,16]{1,0} %x), dimensions={0}
  %agd = bf16[64,16]{1,0} all-gather-done((bf16[8,16]{1,0}, bf16[64,16]{1,0}) %ags)
  %c = bf16[64,16]{1,0} call(bf16[8,16]{1,0} %x), to_apply=%gather_w
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%inner_cond, body=%inner_body
}

%layer_cond (p: (s32[], f32[4])) -> pred[] {
  %i = s32[] get-tuple-element((s32[], f32[4]) %p), index=0
  %n = s32[]{:T(128)} constant(32)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT, metadata={op_name="while/cond/lt"}
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%branch (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%layer_cond, body=%inner_body
}

%skip (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]) tuple(s32[] %i, f32[4] %x)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %s = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%layer_cond, body=%layer
  %c = (s32[], f32[4]) conditional(pred[] %q, %t, %t), branch_computations={%skip, %branch}
}
"""
    runs = sim.run_counts(hlo)
    assert runs["layer"] == (32, 0) and runs["inner_body"] == (32 * 3, 32)
    got = sim.collectives(hlo, detail=True)
    ag = 64 * 16 * 2
    # per layer: the async gather once (not its start's tuple too) and the called one
    assert got["every_step"]["all-gather"] == {"count": 64, "bytes": 64 * ag}
    assert got["every_step"]["all-reduce"] == {"count": 96, "bytes": 96 * 4096}
    assert got["conditional"] == {"all-reduce": {"count": 32, "bytes": 32 * 4096}}
    assert got["ops"][0] == {
        "op": "ar",
        "kind": "all-reduce",
        "computation": "inner_body",
        "where": "every_step",
        "shape": "f32[1024]{0}",
        "runs": 96,
        "bytes": 96 * 4096,
    }
    # a loop whose bound is not a constant counts once, rather than being guessed
    unknown = hlo.replace("%n = s32[]{:T(128)} constant(32)", "%n = s32[] parameter(1)")
    assert sim.run_counts(unknown)["layer"] == (1, 0)


def test_traffic_groups_collectives_by_the_tensor_they_move():
    sim = load()
    ops = [
        # an activation partial sum: the global batch of 32 next to the sequence of 256
        {
            "kind": "all-reduce",
            "where": "every_step",
            "shape": "bf16[32,256,4096]{2,1,0}",
            "runs": 64,
            "bytes": 64 * 32 * 256 * 4096 * 2,
        },
        # a per-device batch (32 / 8) is an activation too, whatever the dtype
        {
            "kind": "all-gather",
            "where": "every_step",
            "shape": "(f32[4,256]{1,0}, f32[4,256])",
            "runs": 1,
            "bytes": 8192,
        },
        {
            "kind": "all-gather",
            "where": "every_step",
            "shape": "bf16[1,4096,14336]{2,1,0}",
            "runs": 64,
            "bytes": 64 * 4096 * 14336 * 2,
        },
        {
            "kind": "all-gather",
            "where": "every_step",
            "shape": "f32[32,14336,1]{1,2,0}",
            "runs": 1,
            "bytes": 32 * 14336 * 4,
        },
        {
            "kind": "all-gather",
            "where": "conditional",
            "shape": "bf16[32,256]",
            "runs": 1,
            "bytes": 1,
        },
    ]
    got = sim.traffic(ops, batch=32, seq=256, n_devices=8)
    assert got == {
        "all-gather: weights": {"count": 64, "bytes": 64 * 4096 * 14336 * 2},
        "all-reduce: activations": {"count": 64, "bytes": 64 * 32 * 256 * 4096 * 2},
        "all-gather: adapter/optimizer state": {"count": 1, "bytes": 32 * 14336 * 4},
        "all-gather: activations": {"count": 1, "bytes": 8192},
    }
    assert list(got)[0] == "all-gather: weights"  # largest first


@pytest.mark.slow  # two compiles, about 40 CPU-seconds
def test_grad_accum_lowers_the_simulated_peak():
    """``--grad-accum``: the step compiled with micro-batches needs less temp memory than the
    step over the whole batch (XLA:CPU's memory analysis; the 8B table in docs/SCALE.md)."""
    sim = load()
    argv = ["--model", "tiny-llama", "--devices", "1", "--batch", "16", "--seq", "64"]
    argv += ["--remat", "full", "--skip-flops"]
    one, four = (sim.main(argv + ["--grad-accum", k])[0] for k in ("1", "4"))
    assert (one["grad_accum"], four["grad_accum"]) == (1, 4)
    assert four["argument_bytes"] == one["argument_bytes"]
    assert four["temp_bytes"] < one["temp_bytes"]
    with pytest.raises(SystemExit):
        sim.parse_args(argv + ["--grad-accum", "3"])
