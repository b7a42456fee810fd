"""The `npcpu` command: train, eval, generate, prepare-text, info, bench (also `python -m npcpu`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from npcpu.config import PRESETS, SCHEMA, ConfigError, build_config, parse_cli_value


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration fields (override the preset and --config)")
    for section, fields in SCHEMA.items():
        for name, field in fields.items():
            choices = f" {{{', '.join(field.choices)}}}" if field.choices else ""
            group.add_argument(f"--{section}.{name}", dest=f"cfg:{section}.{name}", metavar="VALUE",
                               help=f"{field.help}{choices} (default {field.default!r})")


def _overrides(args) -> dict:
    overrides: dict = {}
    for dest, text in vars(args).items():
        if dest.startswith("cfg:") and text is not None:
            key = dest[4:]
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = parse_cli_value(key, text)
    if getattr(args, "threads", None) is not None:
        overrides.setdefault("train", {})["threads"] = args.threads
    return overrides


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npcpu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (no arguments: the embedded default run)")
    train.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="TOML configuration file, or the LLM-trainer guide's YAML "
                       "(.yaml, .yml; needs PyYAML); may be given more than once")
    train.add_argument("--preset", default="default", choices=sorted(PRESETS),
                       help="embedded configuration to start from")
    train.add_argument("--run-dir", type=Path, help="where checkpoints and metrics go "
                       "(default: runs/<preset>-<time>)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its latest checkpoint")
    train.add_argument("--threads", type=int, help="threads for BLAS and Numba")
    train.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto")
    train.add_argument("--print-config", action="store_true",
                       help="print the merged configuration as JSON and exit")
    _add_config_options(train)

    evaluate = sub.add_parser("eval", help="evaluate a run's latest (or best) checkpoint")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--best", action="store_true", help="use the best checkpoint")
    evaluate.add_argument("--threads", type=int)

    generate = sub.add_parser("generate", help="sample text from a language-model run's latest "
                              "checkpoint, streamed to stdout")
    generate.add_argument("run_dir", type=Path)
    generate.add_argument("--prompt", default="", help="text the sample continues (default: "
                          "the start of the validation text's first token)")
    generate.add_argument("--max-new-tokens", type=int, default=500)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=200)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--best", action="store_true", help="use the best checkpoint")
    generate.add_argument("--threads", type=int)

    prepare = sub.add_parser("prepare-text", help="tokenize text files into DIR/train.bin, "
                             "val.bin, tokenizer.json, meta.json (nanoGPT's format)")
    from npcpu.text.prepare import add_arguments as add_prepare_text_arguments
    add_prepare_text_arguments(prepare)

    sub.add_parser("info", help="versions, BLAS, Numba threading layer, CPU bfloat16 support")

    bench = sub.add_parser("bench", help="benchmarks against PyTorch (needs torch)")
    bench.add_argument("name", nargs="?", default="all", help="benchmark to run")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    return parser


def cmd_train(args) -> int:
    from npcpu.dist import abort_on_error, init_world

    world = init_world()  # one process, or this rank's place under mpiexec / srun
    with abort_on_error(world):
        return _train(args, world)


def _train(args, world) -> int:
    from npcpu import backend
    from npcpu.train.build import bind_tokenizer, build_run, load_run_config, save_run_config

    if args.resume is not None:
        if args.config or args.preset != "default":
            raise ConfigError("--resume takes its configuration from the run directory; "
                              "drop --config/--preset (field options may still override it)")
        config = load_run_config(args.resume, overrides=_overrides(args))
        run_dir = args.resume
    else:
        config = build_config(preset=args.preset, files=args.config, overrides=_overrides(args))
        run_dir = args.run_dir or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if world.size > 1 and args.run_dir is None:
            raise ConfigError("under mpiexec give --run-dir (the ranks would each name their own)")
    if args.print_config:
        if world.is_root:
            from npcpu.config import to_json
            print(to_json(config))
        return 0
    threads = config["train"]["threads"]
    backend.set_threads(world.threads_per_rank(threads) if world.size > 1 else threads)
    backend.set_bf16_gemm(config["train"]["bf16_gemm"])
    run = build_run(config, world=world)
    if args.resume is not None:
        bind_tokenizer(run, run_dir, new_run=False)
        info = run.trainer.resume(run_dir)
        run.trainer.log(f"resumed from {info['path']} (step {run.trainer.step})")
    elif world.is_root:
        save_run_config(run_dir, config)
        bind_tokenizer(run, run_dir, new_run=True)
    progress = {"auto": None, "bar": True, "lines": False}[args.progress]
    result = run.fit(run_dir, progress=progress)
    if "eval_loss" in result and world.is_root:
        chance = f"  (chance {1 / run.num_classes:.4f})" if "eval_accuracy" in result else ""
        print(f"final eval: {_eval_summary(result)}{chance}  run dir {run_dir}")
    if run.trainer.interrupted is not None:
        return 130 if run.trainer.interrupted == "SIGINT" else 143
    return 0


def cmd_eval(args) -> int:
    from npcpu.dist import abort_on_error, init_world

    world = init_world()  # under mpiexec the ranks share the evaluation batches
    with abort_on_error(world):
        return _eval(args, world)


def _eval(args, world) -> int:
    from npcpu import backend
    from npcpu.checkpoint import best_checkpoint
    from npcpu.train.build import bind_tokenizer, build_run, load_run_config

    backend.set_threads(world.threads_per_rank(args.threads) if world.size > 1 else args.threads)
    config = load_run_config(args.run_dir)
    run = build_run(config, world=world)
    bind_tokenizer(run, args.run_dir, new_run=False)
    path = best_checkpoint(args.run_dir) if args.best else args.run_dir
    info = run.trainer.resume(path)
    result = run.trainer.evaluate(run.eval_data)
    if world.is_root:
        print(f"{info['path']} (step {run.trainer.step}): eval {_eval_summary(result)}")
    return 0


def _eval_summary(result: dict) -> str:
    """"loss 0.1234  accuracy 0.9600": each eval_* metric the loss reports."""
    return "  ".join(f"{name[len('eval_'):]} {value:.4f}" for name, value in result.items()
                     if name.startswith("eval_"))


def cmd_generate(args) -> int:
    from npcpu import backend
    from npcpu.checkpoint import best_checkpoint
    from npcpu.text.generate import generate_from_run

    backend.set_threads(args.threads)
    path = best_checkpoint(args.run_dir) if args.best else args.run_dir
    generate_from_run(args.run_dir, path, args.prompt, args.max_new_tokens, args.temperature,
                      args.top_k, args.seed, sys.stdout)
    return 0


def cmd_prepare_text(args) -> int:
    from npcpu.text.prepare import run
    return run(args)


def cmd_info(args) -> int:
    from npcpu.info import format_info, system_info
    print(format_info(system_info()))
    return 0


def cmd_bench(args) -> int:
    import runpy
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    if not bench_dir.is_dir():
        raise ConfigError("npcpu bench runs the scripts in the source tree's bench/ directory, "
                          "which this installation does not have (clone the repository)")
    sys.path.insert(0, str(bench_dir))  # the scripts import their shared helpers (common.py ...)
    scripts = sorted(bench_dir.glob("bench_*.py"))
    names = [s.stem[len("bench_"):] for s in scripts]
    chosen = names if args.name == "all" else [args.name]
    for name in chosen:
        if name not in names:
            raise ConfigError(f"unknown benchmark {name!r} (benchmarks: {', '.join(names)})")
        sys.argv = [str(bench_dir / f"bench_{name}.py"), *args.rest]
        runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


def main(argv=None) -> int:
    """Run a command; errors a user can fix (config, data, files) print one line and exit 2.

    Set NPCPU_DEBUG=1 to see the full traceback instead.
    """
    args = make_parser().parse_args(argv)
    commands = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
                "prepare-text": cmd_prepare_text,
                "info": cmd_info, "bench": cmd_bench}
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError, MemoryError) as e:
        if os.environ.get("NPCPU_DEBUG") == "1":
            raise
        print(f"npcpu {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
