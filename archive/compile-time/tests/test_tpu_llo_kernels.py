"""experiments/tpu_llo_kernels.py: reading libtpu's per-kernel dumps (a synthetic dump here; the
real one needs libtpu, which the test environment does not install)."""

from pathlib import Path

import pytest

from tests.test_bench import load_experiment

LLO = load_experiment("tpu_llo_kernels")

LISTING = """$region0: #{broadcast_select_fusion}
  %s0 = inlined_call_operand.vmem [shape: f32[32,32,1536], index: 0, kind: input]
  %s1 = inlined_call_operand.hbm [shape: pred[32,32], index: 1, kind: input]
  %s2 = inlined_call_operand.<no memory space> [shape: u32[], index: 2, kind: input]
"""


def write_dump(root: Path) -> None:
    t0 = 1_796_316_697_000_000_000
    files = {
        # kernel "a.1" starts at t0 and "b" 1.5 s later; "a.1" has two stages, "b" three
        f"{t0}-a.1-00-fingerprints.txt": "x",
        f"{t0 + 10}-a.1-01-original.txt": LISTING,
        f"{t0 + 1_500_000_000}-b-00-fingerprints.txt": "x",
        f"{t0 + 1_500_000_000}-b-01-pre-auto-mxu-assigner.txt": "y" * 50,
        f"{t0 + 1_500_000_000}-b-02-original.txt": "z" * 7,
        # the last kernel starts 0.25 s after "b": its own time is unknown
        f"{t0 + 1_750_000_000}-TLP-00-memory-space-assignment-bufferinfo.txt": "w",
        "not-a-dump-file.txt": "ignored",
    }
    for name, text in files.items():
        (root / name).write_text(text)


def test_parse_dump_times_sizes_and_operands(tmp_path):
    write_dump(tmp_path)
    got = LLO.parse_dump(tmp_path)
    names = [k["name"] for k in got["kernels"]]
    assert names == ["a.1", "b", "TLP"]  # by time taken, the unknown last
    a, b, last = got["kernels"]
    assert a["approx_s"] == 1.5 and b["approx_s"] == 0.25 and last["approx_s"] is None
    # The size of the "original" listing only, not of the other stages.
    assert a["llo_bytes"] == len(LISTING.encode()) and b["llo_bytes"] == 7
    assert a["operands"] == ["vmem f32[32,32,1536]", "hbm pred[32,32]", "<no memory space> u32[]"]
    assert b["operands"] == [] and last["llo_bytes"] == 0
    assert got["total_llo_bytes"] == len(LISTING.encode()) + 7
    assert got["span_s"] == 1.75


def test_parse_dump_of_an_empty_directory(tmp_path):
    assert LLO.parse_dump(tmp_path) == {"kernels": [], "total_llo_bytes": 0, "span_s": 0.0}


def test_main_refuses_what_it_cannot_compile(capsys):
    for argv, says in (
        (["--ablation", "outer-step-alone"], "after '--'"),
        (["--ablation", "no-such", "--", "--layers", "2"], "unknown ['no-such']"),
        (["--", "--layers", "2", "--method", "lora"], "no --method after it"),
    ):
        with pytest.raises(SystemExit):
            LLO.main(argv)
        assert says in capsys.readouterr().err


@pytest.mark.slow
def test_a_compile_for_the_cpu_is_refused_with_the_way_to_a_tpu_one():
    # No --topology: XLA:CPU compiles the step, and libtpu wrote no dump to read.
    from tests.test_bench import TINY_SIM

    with pytest.raises(SystemExit, match="give a TPU --topology"):
        LLO.main(["--", *TINY_SIM])
