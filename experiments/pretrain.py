"""Pre-train a GLM with the GLM objective on a (data, stage, tensor) mesh.

    python experiments/pretrain.py                     # glm-tiny on the shared corpus, one device
    python experiments/pretrain.py --mesh 8x4          # 8 stages x 4 tensor shards (+ data parallel)
    python experiments/pretrain.py --data runs/web-store:0.7,gs://b/code-store:0.3 --profile 10:13
    python experiments/pretrain.py --preset glm-130b --mesh 24x8x4 --dry-run
    python experiments/pretrain.py --preset glm-130b --mesh 24x8x4 --batch 192 --dry-run --topology v5p-1536

Resumes from the latest complete checkpoint in --ckpt-dir (same flags finish the same job: --steps
is the step to train up to). On a CPU-only machine with fewer devices than the mesh needs, CPU
devices are simulated. --dry-run --topology NAME [--slices N] compiles the step ahead of time for a
described TPU pod (libtpu, on any machine): per-chip memory from the TPU compiler, whether it fits
its HBM, and the step time the model FLOPs imply. Ends with a one-line JSON summary.
"""

import argparse
import dataclasses
import json
import os
import sys

from glm_jax.script_args import DEFAULT_RUN, prepare_devices

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm-tiny")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model config field")
    ap.add_argument(
        "--mesh",
        default="1x1",
        help="PxT (stages x tensor, data over the rest), DxPxT, or DxPxTxC (C: context shards splitting each sequence)",
    )
    ap.add_argument(
        "--data",
        default=",".join(os.path.join(DATA, "corpus", f"{lang}.jsonl.gz:0.5") for lang in ("en", "zh")),
        help="sources, comma separated, each SOURCE[:share]: a token store (tokenize_corpus.py), a JSON-lines "
        "file or a folder of them (one source); local or a URL (gs://, s3://); shares are token shares "
        "(a:0.7,b:0.3), for every source or none (none: by size)",
    )
    ap.add_argument(
        "--instructions",
        default=os.path.join(DATA, "advertisegen", "train.json"),
        help="MIP pairs ({content, summary} JSON lines); '' for none",
    )
    ap.add_argument("--steps", type=int, default=300, help="train up to this step")
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=256, help="sequence length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-dir", default=os.path.join(DEFAULT_RUN, "checkpoints"))
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    ap.add_argument("--log-dir", default=os.path.join(DEFAULT_RUN, "logs"))
    ap.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="held-out loss (the mixture's and, with several sources, each source's) every N steps (0: at the end)",
    )
    ap.add_argument(
        "--profile",
        default=None,
        metavar="START:STOP",
        help="write a jax.profiler trace of steps START..STOP-1 (as numbered in metrics.jsonl) under LOG_DIR/profile",
    )
    ap.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help="pipeline microbatches per pass (default: one sequence per data replica each)",
    )
    ap.add_argument(
        "--pass-batch",
        type=int,
        default=None,
        help="sequences per gradient pass (default: --batch); with 1f1b a step is one schedule of "
        "microbatches of pass-batch / microbatches sequences (the batch ramp-up's unit)",
    )
    ap.add_argument(
        "--schedule",
        choices=("1f1b", "gpipe"),
        default=None,
        help="pipeline schedule on a pipelined mesh (default 1f1b)",
    )
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up fraction of the samples")
    ap.add_argument(
        "--ramp-start",
        type=int,
        default=None,
        help="batch ramp-up start (sequences; glm-130b: 192); --no-ramp turns a preset's off",
    )
    ap.add_argument("--ramp-fraction", type=float, default=None, help="share of the samples the ramp-up lasts")
    ap.add_argument("--ramp-increment", type=int, default=None, help="batch increment of the ramp-up (sequences)")
    ap.add_argument("--no-ramp", action="store_true", help="no batch ramp-up")
    ap.add_argument("--max-skips", type=int, default=None, help="stop after this many non-finite steps in a row")
    ap.add_argument("--fsdp", action="store_true", help="also shard parameters over the data axis (FSDP)")
    ap.add_argument(
        "--fsdp-gather",
        choices=("once", "tick"),  # train.FSDP_GATHER (jax is imported after the device flags)
        default="once",
        help="with --fsdp on a pipelined mesh: gather a stage's weights once a step (more memory, one gather) "
        "or on every tick (less memory, a gather per tick)",
    )
    ap.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="split the residual stream's positions over the tensor axis (Megatron's sequence parallelism)",
    )
    ap.add_argument("--two-d", action="store_true", help="2D positions in the samples (GLM / ChatGLM-6B)")
    ap.add_argument(
        "--family", default="glm", help="model family: its tokenizer encodes the data, a causal family trains causally"
    )
    ap.add_argument("--tokenizer", default=None, metavar="FILE", help="the family's tokenizer file")
    ap.add_argument("--sync-checkpoints", action="store_true", help="write checkpoints synchronously")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="compile one step against the mesh without allocating; print per-device memory",
    )
    ap.add_argument(
        "--topology",
        default=None,
        metavar="NAME",
        help="with --dry-run: compile for this TPU topology (v4-8, v5e-16, v5p-1536, v6e-256, v5p:8x8x12)",
    )
    ap.add_argument("--slices", type=int, default=1, help="with --topology: slices over the data-center network")
    ap.add_argument(
        "--dump-hlo", default=None, metavar="FILE", help="with --dry-run: write the compiled step's HLO text"
    )
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "seq", "ckpt_every", "keep"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.topology and not args.dry_run:
        ap.error("--topology plans a TPU pod: it needs --dry-run (nothing runs on a described topology)")
    if args.dump_hlo and not args.dry_run:
        ap.error("--dump-hlo writes the step --dry-run compiles: it needs --dry-run")
    if args.profile is not None:
        if args.dry_run:
            ap.error("--profile traces training steps: not with --dry-run")
        args.profile = parse_profile(ap, args.profile, args.steps)
    return ap, args


def parse_profile(ap, spec: str, steps: int) -> tuple[int, int]:
    """'START:STOP' -> (START, STOP): steps START..STOP-1 (1 <= START < STOP <= steps + 1); else exit 2."""
    start, sep, stop = spec.partition(":")
    try:
        span = (int(start), int(stop)) if sep else None
    except ValueError:
        span = None
    if span is None:
        ap.error(f"--profile {spec}: expected START:STOP, two step numbers (--profile 5:8 traces steps 5, 6, 7)")
    if not 1 <= span[0] < span[1] <= steps + 1:
        ap.error(f"--profile {spec}: needs 1 <= START < STOP <= --steps + 1 ({steps + 1}); steps count from 1")
    return span


def main(argv=None):
    ap, args = parse_args(argv)
    simulated = False
    if args.topology:  # described TPU devices: nothing to simulate, but the mesh spec is still checked
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from glm_jax import sharding as sh

        try:
            sh.parse_mesh(args.mesh)
        except sh.MeshError as error:
            ap.error(str(error))
    else:
        needed, simulated = prepare_devices(ap, args.mesh)
    import jax

    from glm_jax import sharding as sh
    from glm_jax.checkpoints import CheckpointError
    from glm_jax.config import ConfigError, config_from_args
    from glm_jax.data import Corpus, DataError, load_instructions
    from glm_jax.dry_run import dry_run
    from glm_jax.families import FamilyError, get_family
    from glm_jax.objectives import ObjectiveConfig, SequenceBuilder
    from glm_jax.optim import optim_for
    from glm_jax.tokenizer import TokenizerError, bundled_file, check_blanks, check_fits
    from glm_jax.topology import TopologyError
    from glm_jax.train import RunConfig, TrainingError, make_trainer, train

    lead = jax.process_index() == 0
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if lead else (lambda msg: None)
    if simulated and jax.default_backend() == "cpu":
        log(f"no accelerator: simulating {len(jax.devices())} CPU devices for --mesh {args.mesh}")
    try:
        config = config_from_args(args.preset, args.set)
        optim_kw = {
            k: v
            for k, v in dict(
                peak_lr=args.lr,
                warmup_fraction=args.warmup,
                ramp_start=args.ramp_start,
                ramp_fraction=args.ramp_fraction,
                ramp_increment=args.ramp_increment,
                max_consecutive_skips=args.max_skips,
            ).items()
            if v is not None
        }
        optim = optim_for(args.preset, **optim_kw)
        if args.no_ramp:
            optim = dataclasses.replace(optim, ramp_start=None)
        topology = None
        # a spec that names the data size (DxPxT) takes the devices it needs; PxT takes them all
        devices = jax.devices()[:needed] if not args.topology and args.mesh.count("x") >= 2 else None
        if args.topology:
            from glm_jax.topology import parse_topology, plan_fields, topology_devices

            topology = parse_topology(args.topology, args.slices)
            devices = topology_devices(topology)
        mesh = sh.make_mesh(args.mesh, devices)
        run = RunConfig(
            steps=args.steps,
            global_batch=args.batch,
            seq_len=args.seq,
            seed=args.seed,
            ckpt_dir=args.ckpt_dir,
            ckpt_every=args.ckpt_every,
            keep=args.keep,
            log_dir=args.log_dir,
            eval_every=args.eval_every,
            pass_batch=args.pass_batch,
            microbatches=args.microbatches,
            schedule=args.schedule,
            async_checkpoints=not args.sync_checkpoints,
            progress=not args.no_progress,
            fsdp=args.fsdp,
            fsdp_gather=args.fsdp_gather,
            sequence_parallel=args.sequence_parallel,
            family=args.family,
            profile=args.profile,
        )
        if args.dry_run:
            trainer, batches = make_trainer(config, optim, run, mesh)
            if batches.ramp_note:
                log(f"warning: {batches.ramp_note}")
            report = dry_run(trainer, args.seq, hlo_file=args.dump_hlo)
            if topology is not None:
                report = {**report, **plan_fields(topology, devices, report)}
            for k, v in report.items():
                log(f"{k:>28}: {v:,.3f}" if isinstance(v, float) else f"{k:>28}: {v}")
            print(json.dumps({"preset": args.preset, "mesh": args.mesh, "seq": args.seq, **report}))
            return report
        family = get_family(args.family)
        tokenizer = family.load_tokenizer(args.tokenizer)
        check_blanks(tokenizer, f"--family {family.name}'s tokenizer {tokenizer.model_file}")
        if tokenizer.vocab_size > config.vocab_size:
            check_fits(
                tokenizer, config.vocab_size, f"--preset {args.preset} (use --set vocab_size={tokenizer.vocab_size})"
            )
        corpus = Corpus.load(args.data, tokenizer)
        stats = corpus.stats
        log(
            f"corpus: {stats.documents:,} documents from {len(corpus.sources)} source(s); skipped {stats.skipped} "
            f"(bad json {stats.bad_json}, bad utf-8 {stats.bad_utf8}, empty {stats.empty_text}, "
            f"no text {stats.missing_text})"
        )
        for name, source, share in zip(corpus.names, corpus.sources, corpus.shares):
            log(f"  {name}: {len(source.tokens):,} tokens, {share:.1%} of the training tokens ({source.path})")
        pairs = load_instructions(args.instructions, tokenizer) if args.instructions else None
        objective = ObjectiveConfig(position_encoding_2d=args.two_d or config.position_encoding_2d)
        try:
            builder = SequenceBuilder(
                corpus.with_split("train").window,
                args.seq,
                args.seed,
                objective,
                pairs,
                tokenizer.specials,
                family.causal,
            )
            held_out = corpus.with_split("heldout")
            eval_builder = SequenceBuilder(
                held_out.window,
                args.seq,
                args.seed + 1,
                dataclasses.replace(objective, multitask_ratio=0.0),
                None,
                tokenizer.specials,
                family.causal,
            )
            # several sources: each on its own held-out split too (eval_loss/<name>)
            source_evals = {
                name: dataclasses.replace(eval_builder, window=held_out.only(i).window)
                for i, name in enumerate(corpus.names)
                if len(corpus.sources) > 1
            }
        except ValueError as error:  # the objective's own checks: a sequence too short for its samples
            raise ConfigError(f"{error}; pass a longer --seq") from None
        run = dataclasses.replace(run, family=family.name, tokenizer_file=bundled_file(tokenizer))
        summary = train(config, optim, run, mesh, builder, eval_builder, log=log, source_evals=source_evals)
    except (ConfigError, sh.MeshError, DataError, CheckpointError, TokenizerError, FamilyError, TopologyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
    if lead:
        print(json.dumps({"preset": args.preset, "mesh": args.mesh, **summary}))
    return summary


if __name__ == "__main__":
    main()
