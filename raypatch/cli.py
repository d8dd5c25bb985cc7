"""The `raypatch` command: tokenizer, prepare, train, export (and what the jobs/ entrypoints call)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from raypatch.cluster import end_ray, init_ray, quiet_env
from raypatch.config import parse_schedule
from raypatch.console import capture, say
from raypatch.ladder import DEFAULT_LADDER
from raypatch.presets import load_config
from raypatch.safety import InputError, check_name


def tune_command(args: argparse.Namespace) -> dict[str, Path]:
    """`raypatch tune`: one search (or successive halving), then the table, the heatmap and best.yaml."""
    import time

    from raypatch import tune

    check_name(args.name, "--name")
    if not args.budget > 0:
        raise InputError(f"--budget {args.budget:g}: must be > 0")
    if args.rungs < 1 or args.eta < 2 or args.num_samples < 1 or args.concurrency < 0:
        raise InputError("--rungs must be >= 1, --eta >= 2, --num-samples >= 1 and --concurrency >= 0")
    from raypatch.driver import default_data

    base = load_config(args.config, args.set)
    space = tune.parse_space(args.space)
    from raypatch.driver import check_storage, local_root, storage_uri

    check_storage(base)  # the log file goes under the storage path
    # Tune's experiment and the trials' checkpoints go to the storage path (a directory or s3://...); the
    # log, results.md, heatmap and best.yaml to local disk (the storage directory, or ~/raypatch-runs).
    storage, local = storage_uri(base), local_root(base)
    log = local / "logs" / f"tune-{args.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with capture(log, stop=end_ray) as log:
        if log:
            say(f"raypatch tune: Ray, Tune, DeepSpeed and worker output go to {log}")
        init_ray()
        base = default_data(base)
        flops_per_pos = tune.model_flops_per_position(base) if args.flops else None
        t0 = time.perf_counter()
        kw = {"flops_per_pos": flops_per_pos, "multi_epoch": args.multi_epoch, "concurrency": args.concurrency}
        if args.halving:
            rows = tune.successive_halving(base, budget=args.budget, space=space, name=args.name,
                                           storage=storage, rungs=args.rungs, eta=args.eta, **kw)
        else:
            rows = tune.run_search(base, budget=args.budget, space=space, name=args.name, storage=storage,
                                   search=args.search, num_samples=args.num_samples, **kw)
        # The winner is chosen at the largest budget a trial trains (successive halving's last rung).
        positions = args.budget * (args.eta ** (args.rungs - 1) if args.halving else 1) / (flops_per_pos or 1)
        paths = tune.write_outputs(rows, local / args.name, budget=positions, wall_s=time.perf_counter() - t0,
                                   note=transfer_note_for(base, positions, args.ladder))
        say(paths["md"].read_text())
        say("\n".join(f"{k}: {v}" for k, v in paths.items()) + (f"\nlog: {log}" if log else ""))
    return paths


def transfer_note_for(cfg: Any, positions: float, ladders: list[str]) -> str | None:
    """ladder.transfer_note for a search of `positions` per trial on `cfg`'s model (token-only's tokens/param)."""
    from raypatch.ladder import read_ladders, transfer_note
    from raypatch.model import count_params

    rungs, counted = read_ladders(ladders) if ladders else ([], "total")
    params = count_params(cfg.model, exclude_embeddings=counted == "non_embedding")
    return transfer_note(positions / params, rungs, source=", ".join(Path(p).name for p in ladders), params=params)


def evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    """Token-level loss and perplexity in one process, on a shard set's val split and/or raw documents."""
    import tempfile

    from raypatch.checkpoint import META, export_hf

    if args.max_rows < 1 or args.seq_len < 0:
        raise InputError(f"--max-rows must be >= 1 and --seq-len >= 0 (got {args.max_rows}, {args.seq_len})")
    if not args.shards and not args.text:
        raise InputError("evaluate: give --shards and/or --text")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise InputError(f"--model {args.model}: no such directory")
    if (model_dir / META).exists():  # a training checkpoint: consolidate it into a temporary export
        with tempfile.TemporaryDirectory(prefix="raypatch-eval-") as tmp:
            return evaluate_model(export_hf(model_dir, Path(tmp) / "hf"), args)
    return evaluate_model(model_dir, args)


def evaluate_model(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Everything is checked and every row made before the model loads: a directory that names remote code
    (`auto_map`, or a model_type transformers does not build) and a set too short for one row are refused."""
    import math

    from raypatch.data import TokenStream, text_rows, val_rows
    from raypatch.hfdir import read_local_config
    from raypatch.model import lm_loss, loss_sum

    if not (model_dir / "config.json").exists():
        raise InputError(f"--model {args.model}: neither an HF model directory nor a raypatch checkpoint")
    read_local_config(model_dir / "config.json", f"--model {args.model}")
    if not any(model_dir.glob("*.safetensors")):
        raise InputError(f"--model {args.model}: no .safetensors weights (raypatch loads no pickled weights)")
    meta = json.loads((model_dir / "raypatch_meta.json").read_text()) if (model_dir / "raypatch_meta.json").exists() \
        else {}
    trained = meta.get("config", {}).get("data", {}).get("seq_len")
    seq_len = args.seq_len or trained or 1024
    length = ("--seq-len" if args.seq_len else "data.seq_len, the model's training context" if trained
              else "the default: the model records no data.seq_len")
    sets, sources = {}, {}  # name -> (N, T) rows; name -> what they came from
    if args.shards:
        sets["val"] = val_rows(TokenStream(args.shards, "val"), seq_len, args.max_rows)
        sources["val"] = f"--shards {args.shards} (its val split)"
    if args.text:
        sets["text"] = text_rows(args.text, str(model_dir), seq_len, args.max_rows)
        sources["text"] = f"--text {args.text}"
    empty = [sources[name] for name, rows in sets.items() if len(rows) == 0]
    if empty:  # a loss over no rows would read 0.0 (perplexity 1.0): a result that is not one
        raise InputError(f"evaluate: no row of {seq_len} tokens ({length}) could be made from "
                         f"{' nor from '.join(empty)}: fewer tokens than one row there (evaluate on more text, or "
                         f"give a smaller --seq-len)")
    try:
        model = _load_causal_lm(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"--model {args.model}: cannot be loaded ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    out: dict[str, Any] = {"model": str(model_dir), "seq_len": seq_len}
    for name, rows in sets.items():
        total, count = loss_sum(lambda ids: lm_loss(model, ids, 1), rows, micro_batch=8)
        loss = total / count
        out[name] = {"rows": count, "loss": loss, "ppl": math.exp(min(loss, 50.0))}
    return out


def _load_causal_lm(model_dir: Path) -> Any:
    """The exported model, from safetensors and local files only, running no code of the directory's own."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                trust_remote_code=False).eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypatch", description="Patch-level training of LLMs on Ray.")
    sub = p.add_subparsers(dest="cmd", required=True)

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tok_cmd", required=True)
    tt = tok_sub.add_parser("train", help="train a byte-level BPE and save an HF tokenizer directory")
    tt.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl/.txt/.parquet, .gz ok)")
    tt.add_argument("--out", required=True)
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer directory at --out")

    pr = sub.add_parser("prepare", help="tokenize raw text into Parquet shards with Ray Data")
    pr.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl/.txt/.parquet, .gz ok)")
    pr.add_argument("--tokenizer", required=True, help="a local HF tokenizer directory")
    pr.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB",
                    help="first train a byte-level BPE of this size into --tokenizer (if it does not exist)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--text-field", default="text")
    pr.add_argument("--val-every", type=int, default=50, help="every Nth document goes to the val split (0: none)")
    pr.add_argument("--shard-tokens", type=int, default=1 << 24)
    pr.add_argument("--shuffle-seed", type=int, default=None, metavar="SEED",
                    help="write the train documents in a seeded random order (for corpora sorted by source or "
                         "topic: training streams the shards in order); memory about train size / 64")
    pr.add_argument("--overwrite", action="store_true")

    tr = sub.add_parser("train", help="train (patch phase, then token phase) with Ray Train + DeepSpeed")
    tr.add_argument("--config", default="demo", help="a preset (tiny, demo, paper-370m) or a YAML file")
    tr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-3")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    tr.add_argument("--gpu-hour-price", type=float, default=None, metavar="PRICE",
                    help="price of one device-hour: the savings meter then shows money saved (gpu_hour_price)")

    tu = sub.add_parser("tune", help="search K and λ (and friends) under a fixed compute budget with Ray Tune")
    tu.add_argument("--config", default="demo", help="the base preset or YAML file")
    tu.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the base config")
    tu.add_argument("--budget", type=float, required=True,
                    help="compute per trial: model positions (tokens + patches), or FLOPs with --flops")
    tu.add_argument("--flops", action="store_true", help="--budget is in FLOPs (6·N + attention per position)")
    tu.add_argument("--space", nargs="+", default=["k-lam"],
                    help="dotted key=v1,v2 / key=uniform:a:b / key=loguniform:a:b, or a named space "
                         "(k-lam, lam, k, k-lam-lr)")
    tu.add_argument("--search", default="grid", choices=["grid", "random", "optuna"])
    tu.add_argument("--num-samples", type=int, default=8, help="trials for random and optuna search")
    tu.add_argument("--halving", action="store_true",
                    help="successive halving over budgets: complete runs at budget, η·budget, η²·budget")
    tu.add_argument("--rungs", type=int, default=3)
    tu.add_argument("--eta", type=int, default=2)
    tu.add_argument("--multi-epoch", action="store_true", help="repeat the corpus when a trial needs more tokens")
    tu.add_argument("--name", default="tune", help="experiment name; rerun the same name to continue it")
    tu.add_argument("--concurrency", type=int, default=0, help="max concurrent trials (0: from the cluster)")
    tu.add_argument("--ladder", nargs="*", default=[str(DEFAULT_LADDER)], metavar="FILE",
                    help="measured ladders: results.md warns when the search runs well below where patch-level "
                         "training pays off (default: raypatch's own, benchmarks/regime.py; none: no ladder)")

    pl = sub.add_parser("plan", help="the (K, λ, D) options a compute budget affords")
    pl.add_argument("--budget", type=float, required=True, help="model positions (tokens + patches)")
    pl.add_argument("--config", default="demo", help="the preset or YAML whose optim.tokens_per_step trials use")
    pl.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of that config")
    pl.add_argument("--corpus-tokens", type=int, required=True)
    pl.add_argument("--k", default="1,2,4,8")
    pl.add_argument("--lam", default="0.5,0.667,0.8")
    pl.add_argument("--schedule", default="", metavar="K:SHARE,...|...",
                    help="phase schedules to plan too, separated by | (e.g. '16:0.2,4:0.4,1:0.4|4:0.667,1:0.333')")
    pl.add_argument("--experiment", default="", help="a finished `raypatch tune` output directory")
    pl.add_argument("--ladder", nargs="+", default=[], metavar="FILE",
                    help="measured ladders (benchmarks/regime.py's regime_ladder.json; builtin: the one "
                         "raypatch ships): predict Δ for each (K, λ)")
    pl.add_argument("--params", type=int, default=0,
                    help="the target model's parameters for --ladder (default: counted from --config's model, "
                         "the way the ladder counts them)")

    ev = sub.add_parser("evaluate", help="token-level (K=1) loss and perplexity of an exported model or checkpoint")
    ev.add_argument("--model", required=True, help="an HF directory from `raypatch export`, or a checkpoint directory")
    ev.add_argument("--shards", default="", help="a shard directory: score its val split")
    ev.add_argument("--text", default="", help="a JSONL(.gz) of documents, e.g. the WikiText-103 test docs")
    ev.add_argument("--seq-len", type=int, default=0, help="T (default: the model's training context)")
    ev.add_argument("--max-rows", type=int, default=256)

    ex = sub.add_parser("export", help="consolidate a checkpoint into a Hugging Face model directory")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--out", required=True, help="a new directory (never inside the checkpoint or its run)")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    ex.add_argument("--tokenizer", default=None,
                    help="the run's tokenizer where it is now, when it moved (checked to be the same by content)")
    return p


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    args = build_parser().parse_args(argv)
    try:
        run_command(args)
    except KeyboardInterrupt:
        print("raypatch: interrupted; stopping the Ray processes this command started", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns every error into one line
        return report_error(e, output_dirs(args))
    finally:
        end_ray()
    return 0


def output_dirs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Where the command writes, as (path, what): the places whose free space a full disk's error line reports."""
    import tempfile

    out = [(p, f"--{k}") for k in ("out",) if (p := getattr(args, k, None))]
    if args.cmd in ("train", "tune"):
        try:
            out.append((load_config(args.config, args.set).checkpoint.storage_path, "checkpoint.storage_path"))
        except Exception:  # noqa: BLE001 - a bad config has its own error; the free space is a courtesy
            pass
    return out + [(tempfile.gettempdir(), "temporary files"), ("~/.cache/raypatch", "logs")]


def report_error(e: BaseException, outputs: list[tuple[str, str]] | None = None) -> int:
    """Bad input (ValueError, also behind Ray's wrappers; OSError on a user's path) and a full disk: one line,
    exit 2. Anything else is a bug: one line naming a log file that holds the traceback, exit 1."""
    import errno
    import traceback

    from raypatch.safety import find_input_error, find_os_error, free_space_note, one_line

    full = find_os_error(e, errno.ENOSPC)
    if full is not None:  # before the rest: the disk that is full may be the one the log file is on
        where = f" writing {full.filename}" if full.filename else ""
        note = free_space_note([*([(os.path.dirname(str(full.filename)), "that file")] if full.filename else []),
                                *(outputs or [])])
        print(f"raypatch: error: no space left on device{where}; {note or 'free space unknown'}. Free some space "
              "and run the same command again (a run resumes from its last committed checkpoint)", file=sys.stderr)
        return 2

    cause = find_input_error(e) if isinstance(e, Exception) else None
    if cause is None and isinstance(e, ValueError) and not type(e).__module__.startswith("ray"):
        cause = e
    if cause is not None:
        print(f"raypatch: error: {one_line(str(cause))}", file=sys.stderr)
        return 2
    if isinstance(e, OSError) and e.filename:
        print(f"raypatch: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    log = Path("~/.cache/raypatch").expanduser() / f"error-{os.getpid()}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(e)))
        where = f" (traceback in {log})"
    except OSError:
        where = ""
    print(f"raypatch: error: internal error {type(e).__name__}: {one_line(str(e))[:300]}{where}", file=sys.stderr)
    return 1


def run_command(args: argparse.Namespace) -> None:
    if args.cmd == "tokenizer":
        from raypatch.prepare import train_tokenizer

        print(train_tokenizer(args.input, args.out, vocab_size=args.vocab_size, text_field=args.text_field,
                              overwrite=args.overwrite))
    elif args.cmd == "prepare":
        from raypatch.prepare import prepare

        if args.train_tokenizer and not Path(args.tokenizer).exists():
            from raypatch.prepare import train_tokenizer

            train_tokenizer(args.input, args.tokenizer, vocab_size=args.train_tokenizer, text_field=args.text_field)
        import time

        log = Path("~/.cache/raypatch/logs").expanduser() / f"prepare-{time.strftime('%Y%m%d-%H%M%S')}.log"
        with capture(log, stop=end_ray) as log:
            if log:
                say(f"raypatch prepare: Ray output goes to {log}")
            m = prepare(args.input, args.tokenizer, args.out, text_field=args.text_field, val_every=args.val_every,
                        shard_tokens=args.shard_tokens, overwrite=args.overwrite, shuffle_seed=args.shuffle_seed,
                        start=lambda: init_ray(dashboard=False))
            say(json.dumps({k: {"rows": v["rows"], "tokens": v["tokens"], "shards": len(v["shards"])}
                            for k, v in m["splits"].items()}))
    elif args.cmd == "train":
        cfg = load_config(args.config, args.set)
        if args.gpu_hour_price is not None:
            from raypatch.config import replace

            cfg = replace(cfg, gpu_hour_price=args.gpu_hour_price)
        if args.print_config:
            from raypatch.config import to_yaml

            print(to_yaml(cfg))
            return
        from raypatch.driver import train_and_compare

        train_and_compare(cfg)
    elif args.cmd == "tune":
        tune_command(args)
    elif args.cmd == "plan":
        from raypatch.tune import plan_table, read_results

        ks, lams = parse_list(args.k, int, "--k"), parse_list(args.lam, float, "--lam")
        if not args.budget > 0 or args.corpus_tokens <= 0:
            raise InputError(f"--budget and --corpus-tokens must be > 0 (got {args.budget:g}, {args.corpus_tokens})")
        if any(k < 1 for k in ks) or any(not 0 <= x < 1 for x in lams):
            raise InputError(f"--k values must be >= 1 and --lam values in [0, 1) (got {args.k}, {args.lam})")
        schedules = [x.strip() for x in args.schedule.split("|") if x.strip()]
        for text in schedules:  # a malformed schedule is bad input; one the budget cannot afford is a table row
            try:
                parse_schedule(text)
            except ValueError as e:
                why = str(e).removeprefix("config field 'phases.schedule': ")
                raise InputError(f"--schedule {text!r}: {why}") from None
        results = read_results(args.experiment) if args.experiment else None
        cfg = load_config(args.config, args.set)
        print(plan_table(args.budget, args.corpus_tokens, ks=ks, lams=lams,
                         tokens_per_step=cfg.optim.tokens_per_step, results=results, schedules=schedules))
        if args.ladder:
            from raypatch.ladder import advice_table, read_ladders

            rungs, counted = read_ladders(args.ladder)
            from raypatch.model import count_params

            params = args.params or count_params(cfg.model, exclude_embeddings=counted == "non_embedding")
            print("\n" + advice_table(rungs, params=params, budget=args.budget))
            if schedules:
                print("(the ladder measured K=4, λ=2/3 only: it predicts nothing for the schedules above)")
    elif args.cmd == "evaluate":
        print(json.dumps(evaluate_command(args), indent=1))
    elif args.cmd == "export":
        from raypatch.checkpoint import export_hf, local_copy

        with local_copy(args.checkpoint) as ckpt:  # a checkpoint on S3 (or any URI) is read from a local copy
            print(export_hf(ckpt, args.out, tokenizer_dir=args.tokenizer, overwrite=args.overwrite))


def parse_list(text: str, kind: type, flag: str) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None


if __name__ == "__main__":
    sys.exit(main())
