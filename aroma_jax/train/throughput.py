"""Steps/s, tokens/s and model-FLOPs utilisation of a training run, and its profiler window.

`model_flops` counts one step of a model whose weights are frozen (the AROMA/LoRA step: the
adapters add well under 1% of the FLOPs): every matmul with a frozen weight costs its forward
FLOPs and once more for the input gradient; attention's two activation-by-activation products
cost twice more (both operands need gradients). Counted as ``2 * m * n * k`` per product;
softmax, norms and elementwise work are left out, as usual for MFU. ``experiments/bench.py``
uses the same count for its floor step and cross-checks it against XLA's own.

MFU needs the device's peak FLOP rate: `PEAK_TFLOPS` has the dense peaks of the usual GPUs and
TPUs from their data sheets; on CPU (or an unknown device) MFU is not reported.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import jax

# Dense peak TFLOP/s by device kind (substring) and dtype, from the vendors' data sheets;
# fp32 matmuls on NVIDIA GPUs run as TF32 under JAX's default precision.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "L4": {"bfloat16": 121.0, "float32": 60.0},
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0},
    "TPU v5p": {"bfloat16": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0},
}


def model_flops(arch: str, cfg: Any, batch: int, seq: int) -> float | None:
    """Model FLOPs of one frozen-weight training step of ``batch`` sequences of ``seq`` tokens
    (see the module docstring); None for an architecture without a count (BART)."""
    if arch not in ("roberta", "bert", "llama"):
        return None  # BART's config has no hidden_size; an encoder-decoder count is not written
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = cfg.intermediate_size
    tokens = batch * seq
    attention = 2 * 2 * batch * seq * seq * h * layers  # scores and weighted values, forward
    if arch in ("roberta", "bert"):
        per_token = layers * (4 * h * h + 2 * h * inter)
        head = batch * (h * h + h * cfg.num_labels)  # the classifier reads the first token
        dense = 2 * (tokens * per_token + head)
    elif arch == "llama":
        kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
        per_token = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * cfg.vocab_size
        dense = 2 * tokens * per_token
    else:
        return None
    return float(2 * dense + 3 * attention)


def peak_tflops(device_kind: str, dtype: str, override: float | None = None) -> float | None:
    """The device's dense peak TFLOP/s for ``dtype`` (None: unknown, e.g. a CPU)."""
    if override:
        return override
    for kind, peaks in PEAK_TFLOPS.items():  # longest names first where they overlap
        if kind in device_kind:
            return peaks.get(dtype)
    return None


def report(
    step_ms: float | None, batch: int, seq: int, flops: float | None, dtype: str
) -> dict[str, Any]:
    """steps/s, tokens/s (padded: ``batch * seq`` per step) and, on GPU/TPU, MFU over all
    devices of the run; the reason where MFU is not given."""
    out: dict[str, Any] = {"steps_per_s": None, "tokens_per_s": None, "model_flops_per_step": flops}
    if not step_ms:
        return {**out, "mfu": None, "mfu_note": "no timed steps (the run was too short)"}
    steps = 1000.0 / step_ms
    out.update(steps_per_s=_sig(steps), tokens_per_s=_sig(steps * batch * seq))
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind, dtype)
    if device.platform == "cpu":
        return {**out, "mfu": None, "mfu_note": "MFU is not reported on CPU (no peak FLOP rate)"}
    if flops is None or peak is None:
        why = "no FLOP count for this model" if flops is None else "unknown peak"
        return {**out, "mfu": None, "mfu_note": f"{why} ({device.device_kind}, {dtype})"}
    rate = flops * steps / 1e12
    out.update(tflops_per_s=_sig(rate), peak_tflops=peak * jax.device_count())
    return {**out, "mfu": _sig(rate / (peak * jax.device_count())), "mfu_note": None}


def _sig(x: float) -> float:
    return float(f"{x:.6g}")  # six significant digits: enough for any rate, short in JSON


def parse_window(spec: str | None) -> tuple[int, int] | None:
    """``"START:STOP"`` -> (start, stop): trace steps ``start < step <= stop`` (1-based, the
    steps counted as the progress bar counts them)."""
    if not spec:
        return None
    start, _, stop = str(spec).partition(":")
    if not (start.isdigit() and stop.isdigit()) or int(stop) <= int(start):
        raise ValueError(
            f"--profile {spec!r}: accepted START:STOP with 0 <= START < STOP, e.g. 10:13 "
            "traces steps 11, 12 and 13"
        )
    return int(start), int(stop)


class Profiler:
    """Starts a JAX profiler trace before step ``start + 1`` and stops it after step ``stop``,
    into ``DIR/profile`` (TensorBoard's profile plugin reads it; ``*.trace.json.gz`` opens in
    Perfetto). Only the writing process traces."""

    def __init__(self, window: tuple[int, int] | None, directory: Path, enabled: bool = True):
        self.window = window if enabled else None
        self.directory = directory
        self.active = False

    def before(self, step: int) -> None:
        """Call before running step ``step + 1`` (``step`` steps done)."""
        if self.window is not None and step == self.window[0] and not self.active:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        """Call after step ``step``; waits for ``outputs`` so the trace holds the whole step."""
        if self.active and step >= self.window[1]:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False

    @contextlib.contextmanager
    def guard(self):
        """Stops a trace left running by an early exit (an error, all modules done)."""
        try:
            yield self
        finally:
            self.stop()


# Events of XLA's executor threads that are its own bookkeeping, not an op.
_NOT_OPS = ("ThunkExecutor", "ThreadpoolListener", "end: ")


def trace_file(directory: str | Path) -> Path:
    """The newest Perfetto trace (``perfetto_trace.json.gz``) under a ``--profile`` directory."""
    found = sorted(Path(directory).glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {str(directory)!r}")
    return found[-1]


def top_ops(trace: str | Path, steps: int, n: int = 15) -> list[dict[str, Any]]:
    """The XLA ops that took the most time in a trace, by self time (an op's duration less the
    ops nested in it, e.g. a ``while`` loop's body), summed over XLA's threads (``tf_XLA*``; the
    Python thread's dispatch and waiting are left out) and divided by ``steps``. An op split
    over several threads counts each part, so the total is thread time, above the wall time:
    ``[{"op", "ms_per_step", "share", "calls_per_step"}]``, largest first."""
    import gzip
    import json

    events = json.loads(gzip.open(trace).read())["traceEvents"]
    xla_threads = {
        (e["pid"], e["tid"])
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "thread_name"
        and str(e["args"].get("name", "")).startswith("tf_XLA")
    }
    by_thread: dict[tuple, list[dict]] = {}
    for e in events:
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") == "X" and key in xla_threads and not e["name"].startswith(_NOT_OPS):
            by_thread.setdefault(key, []).append(e)
    self_us: dict[str, float] = {}
    calls: dict[str, int] = {}
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        records, stack = [], []  # stack: the ops enclosing the current one
        for e in evs:
            while stack and e["ts"] >= stack[-1]["end"]:
                stack.pop()
            if stack:
                stack[-1]["self"] -= e["dur"]
            rec = {"name": e["name"], "end": e["ts"] + e["dur"], "self": e["dur"]}
            stack.append(rec)
            records.append(rec)
        for rec in records:
            self_us[rec["name"]] = self_us.get(rec["name"], 0.0) + max(rec["self"], 0.0)
            calls[rec["name"]] = calls.get(rec["name"], 0) + 1
    total = sum(self_us.values()) or 1.0
    ranked = sorted(self_us.items(), key=lambda kv: -kv[1])[:n]
    return [
        {
            "op": name,
            "ms_per_step": round(us / 1000.0 / steps, 3),
            "share": round(us / total, 4),
            "calls_per_step": round(calls[name] / steps, 2),
        }
        for name, us in ranked
    ]
