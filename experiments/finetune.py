"""Fine-tune a checkpoint on instruction or dialogue data: any method of glm_jax/peft.py (lora, ptuning,
prompt, ptuning-v1, adapter, ia3, freeze, full).

    python experiments/finetune.py --method lora --checkpoint runs/default/checkpoints \\
        --data ../shared/data/advertisegen/train.json --eval-data ../shared/data/advertisegen/dev.json \\
        --out runs/lora --steps 300
    python experiments/finetune.py --method ptuning --quantize int4 ...   # adapters on an INT4 base
    python experiments/finetune.py ... --merge                           # also OUT/merged (serving)

Data: AdvertiseGen {content, summary}, Alpaca {instruction, input, output}, ChatGLM2 {prompt,
response, history} and ChatGLM3 {conversations} files, JSON lines or one JSON array, format per
row from its keys; prompts in the checkpoint's family format (glm_jax/sft.py). Defaults per
method are the reference recipes (docs/reference.md#8-fine-tuning-recipes): P-tuning v2 pre_seq_len 128, lr 2e-2;
LoRA r 8, alpha 32, dropout 0.1 on the fused query_key_value (one A, as peft), lr 5e-4; freeze
(last 2 layers) and full lr 1e-4; prompt / ptuning-v1 20 virtual tokens; adapter 64; ia3 on key,
value and dense_4h_to_h (docs/finetuning.md); batch 16. `--set` takes method knobs (lora_rank=16,
lora_targets=query,value, lora_dora=true, lora_rslora=true, pre_seq_len=64,
prefix_projection=true (prefix tuning), num_virtual_tokens=10, prompt_encoder=lstm,
adapter_size=32, ia3_targets=key,value, trainable_layers=4, train_head=true) and model config
fields (hidden_dropout=0.1).

Writes OUT/checkpoints (trainable parameters + optimizer state: a killed run resumes exactly
with the same command), OUT/logs (metrics.jsonl, TensorBoard, metrics.png), OUT/adapter (the
trainable parameters alone, with the method and the base's identity; `--adapter OUT` on
generate.py, the *_eval.py scripts and serve), and with --merge OUT/merged (a full serving
checkpoint: LoRA and IA3 merged into the float weights, a P-tuning prefix or bottleneck adapters
carried inside; the float base read again from --checkpoint once training has freed the
devices). The base is read straight into the trainer's shardings on --mesh (each device its
share, never the whole model on one); an fp16 base trains with a loss scale that starts at 2^7
and doubles every finite step up to 2^16 (optim.FINETUNE_LOSS_SCALE). Ends with a one-line
JSON summary.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys

from glm_jax.script_args import DEFAULT_CHECKPOINTS, prepare_devices

LOSSES = ("dpo", "ipo", "simpo", "orpo")  # pair_objectives.LOSSES (that module imports JAX)

METHOD_LR = {"ptuning": 2e-2, "lora": 5e-4, "freeze": 1e-4, "full": 1e-4}
METHOD_LR["adapter"] = 3e-4  # Houlsby et al.: the middle of their sweep {3e-5, 3e-4, 3e-3}
METHOD_LR["ia3"] = 3e-3  # T-Few (Liu et al. 2022), the paper that introduced IA3
METHOD_LR["prompt"] = 3e-2  # peft's prompt-based methods guide (Lester et al.: 0.3, with Adafactor)
METHOD_LR["ptuning-v1"] = 1e-3  # peft's P-tuning guide; its MLP of width hidden_size moves faster than one embedding
# DPO and its variants move a model already tuned by SFT: a tenth of the method's SFT rate by default
OBJECTIVE_LR_FACTOR = {"sft": 1.0, "dpo": 0.1, "reward": 1.0}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--method",
        choices=tuple(METHOD_LR),
        required=True,
        help="lora (LoRA / rsLoRA / DoRA), ptuning (P-tuning v2; with --set prefix_projection=true: prefix "
        "tuning, Li & Liang), prompt (prompt tuning), ptuning-v1 (P-tuning with an MLP/LSTM prompt encoder), "
        "adapter (Houlsby bottlenecks), ia3, freeze, full",
    )
    ap.add_argument(
        "--objective",
        choices=tuple(OBJECTIVE_LR_FACTOR),
        default="sft",
        help="sft (instruction / dialogue data); dpo (preference pairs: DPO or, with --loss, IPO, SimPO, ORPO); "
        "reward (preference pairs: a reward model, the method's leaves plus a scalar value head)",
    )
    ap.add_argument(
        "--loss",
        choices=LOSSES,
        default="dpo",
        help="with --objective dpo: dpo (sigmoid, trl's default), ipo, simpo (reference-free, length-normalised), "
        "orpo (SFT + odds ratio, reference-free)",
    )
    ap.add_argument("--beta", type=float, default=0.1, help="DPO / IPO / SimPO beta; ORPO's lambda (trl's)")
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO's label smoothing (dpo only)")
    ap.add_argument("--simpo-gamma", type=float, default=0.5, help="SimPO's target reward margin")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINTS, help="the base model (any checkpoint folder)")
    ap.add_argument("--data", action="append", required=True, metavar="FILE", help="training file (repeatable)")
    ap.add_argument("--eval-data", action="append", default=[], metavar="FILE", help="held-out file(s)")
    ap.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="FILE:SHARE",
        help="replay general instruction data beside the task's: SHARE (0-1) of the training samples "
        "from FILE (repeatable)",
    )
    ap.add_argument("--eval-limit", type=int, default=256, help="held-out rows used (0: all)")
    ap.add_argument("--out", required=True, help="output folder (resumed if it holds checkpoints)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16, help="global batch (packed sequences)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's)")
    ap.add_argument("--warmup", type=float, default=0.0, help="warm-up fraction of the steps")
    ap.add_argument("--max-source", type=int, default=64, help="prompt ids kept (max_source_length)")
    ap.add_argument("--max-target", type=int, default=128, help="reply ids kept (max_target_length)")
    ap.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="packed sequence length (default: max-source + max-target + 4; twice that for pairs)",
    )
    ap.add_argument(
        "--last-turn-only", action="store_true", help="train only the last reply of a conversation (ChatGLM2's script)"
    )
    ap.add_argument("--mesh", default="1x1", help="PxT or DxPxT, as pretrain.py")
    ap.add_argument(
        "--quantize",
        choices=("none", "int8", "int4"),
        default="none",
        help="run the frozen base quantized (the adapter methods: all but freeze and full)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method knob (lora_rank, pre_seq_len, ...) or a model config field",
    )
    ap.add_argument("--tokenizer", default=None, metavar="FILE")
    ap.add_argument("--family", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps (and before step 1)")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument(
        "--merge",
        action="store_true",
        help="also write OUT/merged, a full serving checkpoint (the float base is read again when the run ends)",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "max_source", "max_target", "ckpt_every"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return ap, args


def split_sets(items, peft_cls):
    """--set items -> (method knobs, model config overrides), each typed."""
    from glm_jax.config import ConfigError, parse_overrides

    knobs = {f.name: f for f in dataclasses.fields(peft_cls)}
    method, model = {}, []
    for item in items:
        key, _, raw = item.partition("=")
        key = key.strip()
        if key in knobs and key != "method":
            kind = type(knobs[key].default)
            try:
                method[key] = raw.strip().lower() in ("1", "true", "yes", "on") if kind is bool else kind(raw.strip())
            except ValueError:
                raise ConfigError(f"--set {item!r}: expected {kind.__name__}") from None
        else:
            model.append(item)
    return method, parse_overrides(model)


def main(argv=None):
    ap, args = parse_args(argv)
    needed, _ = prepare_devices(ap, args.mesh)
    import jax

    from glm_jax import sharding as sh
    from glm_jax.adapters import Adapter, attach, save_adapter
    from glm_jax.checkpoints import CheckpointError, move_to_device, read_checkpoint, save_serving
    from glm_jax.config import ConfigError
    from glm_jax.data import DataError
    from glm_jax.loading import load_model, quantize_on_load
    from glm_jax.optim import FINETUNE_LOSS_SCALE, OptimConfig
    from glm_jax.peft import PeftConfig, base_identity, count, merge_adapters, nbytes, split_shapes
    from glm_jax.tokenizer import bundled_file
    from glm_jax.train import RunConfig, TrainingError, as_master, base_shardings, train

    lead = jax.process_index() == 0
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if lead else (lambda msg: None)
    out = os.path.abspath(args.out)
    try:
        knobs, model_overrides = split_sets(args.set, PeftConfig)
        if args.objective != "sft":  # trl's disable_dropout: the policy and its reference see the same model
            knobs = {"lora_dropout": 0.0, "prefix_dropout": 0.0, **knobs}
        peft = PeftConfig(method=args.method, value_head=args.objective == "reward", **knobs)
        quantize = None if args.quantize == "none" else args.quantize
        if quantize and not peft.is_adapter:
            raise ConfigError(
                f"--quantize {quantize} runs a frozen base quantized: it takes an adapter method, not {peft.method}"
            )
        # DxPxT names every axis: exactly that many devices (PxT: data parallel over the rest)
        mesh = sh.make_mesh(args.mesh, jax.devices()[:needed] if args.mesh.count("x") == 2 else None)

        def shardings(base_config):  # the trainer's, so the base is read (and quantized) where it trains
            return base_shardings(peft.model_config(base_config).override(**model_overrides), mesh)

        base_model = load_model(args.checkpoint, tokenizer_file=args.tokenizer, family=args.family, shardings=shardings)
        identity = base_identity(base_model.config, base_model.params, base_model.step)
        if args.merge:
            _check_merge(peft, base_model.config)
        base_config, base = quantize_on_load(
            base_model.config, base_model.take_params(), quantize, base_model.path, consume=True, shardings=shardings
        )
        config = peft.model_config(base_config).override(**model_overrides)
        # a pair's two answers share a row: twice an SFT sample's room
        seq_len = args.seq_len or (args.max_source + args.max_target + 4) * (1 if args.objective == "sft" else 2)
        if seq_len > config.max_sequence_length:
            raise ConfigError(
                f"--seq-len {seq_len} exceeds the model's max_sequence_length={config.max_sequence_length}"
            )
        ckpt_dir = os.path.join(out, "checkpoints")
        _check_resume(ckpt_dir, peft, identity)
        common = dict(
            family=base_model.family,
            tok=base_model.tokenizer,
            two_d=config.position_encoding_2d,
            seq_len=seq_len,
            max_source=args.max_source,
            max_target=args.max_target,
            last_only=args.last_turn_only,
        )
        builder, eval_builder = _builders(args, common, log)
        objective = _objective(args, builder, eval_builder)
        lr = args.lr or METHOD_LR[args.method] * OBJECTIVE_LR_FACTOR[args.objective]
        # the reference trainers (transformers' Trainer): AdamW, no weight decay, b2 0.999, clip 1.0;
        # an fp16 base's loss scale starts low and grows fast (optim.FINETUNE_LOSS_SCALE)
        optim = OptimConfig(
            peak_lr=lr,
            init_lr=lr if args.warmup == 0 else lr * 1e-3,
            warmup_fraction=args.warmup,
            min_lr_ratio=0.0,
            weight_decay=0.0,
            b2=0.999,
            **FINETUNE_LOSS_SCALE,
        )
        run = RunConfig(
            steps=args.steps,
            global_batch=args.batch,
            seq_len=seq_len,
            seed=args.seed,
            ckpt_dir=ckpt_dir,
            ckpt_every=args.ckpt_every,
            keep=2,
            log_dir=os.path.join(out, "logs"),
            eval_every=args.eval_every if eval_builder else 0,
            eval_batches=eval_builder.batches_to_cover(args.batch) if eval_builder else 0,
            progress=not args.no_progress,
            family=base_model.family.name,
            tokenizer_file=bundled_file(base_model.tokenizer),
        )
        shapes = split_shapes(peft, config)
        saved = {}

        def on_done(params, step):  # on every process: the saves are collective, process 0 moves files
            saved["adapter"] = _replace(
                out,
                "adapter",
                lambda tmp: save_adapter(
                    tmp,
                    config,
                    peft,
                    params,
                    step,
                    identity,
                    base_model.family.name,
                    bundled_file(base_model.tokenizer),
                ),
            )
            if args.merge:  # the float base read again, into its shardings: the trainer's memory is free
                adapter = Adapter(config, peft, params, step, identity, saved["adapter"])
                where = shardings(base_model.config)
                merged_config, merged = attach(
                    adapter, base_model.config, read_checkpoint(base_model.path, base_model.step, shardings=where)[1]
                )
                merged, merged_config = merge_adapters(merged, merged_config)  # what cannot merge is carried
                saved["merged"] = _replace(
                    out,
                    "merged",
                    lambda tmp: save_serving(
                        os.path.join(tmp, "merged"),
                        merged_config,
                        move_to_device(dict(merged)),
                        step,
                        f"finetune {peft.method} merged onto {base_model.path}",
                        base_model.family.name,
                        bundled_file(base_model.tokenizer),
                    ),
                )

        summary = train(
            config,
            optim,
            run,
            mesh,
            builder,
            eval_builder,
            log=log,
            peft=peft,
            base=base,
            meta={"peft": peft.to_dict(), "base": identity, "base_checkpoint": base_model.path},
            on_done=on_done,
            objective=objective,
        )
    except (ConfigError, sh.MeshError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
    trainable, frozen = shapes
    held = jax.eval_shape(as_master, trainable)  # what trains, and its two Adam moments, as held
    dtypes = lambda tree: "+".join(sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(tree)}))  # noqa: E731
    report = {
        "objective": args.objective if args.objective != "dpo" else args.loss,
        "method": args.method,
        "quantize": args.quantize,
        "trainable_params": count(trainable),
        "frozen_params": count(frozen),
        "trainable_fraction": count(trainable) / max(1, count(trainable) + count(frozen)),
        "optimizer_bytes": 2 * nbytes(held),
        "trainable_dtype": dtypes(held),
        "moment_dtype": dtypes(held),
        "adapter_bytes": _folder_bytes(saved.get("adapter")),
        "adapter_dir": saved.get("adapter"),
        "merged_dir": saved.get("merged"),
        "lr": lr,
        "seq_len": seq_len,
        "train_data": builder.stats.summary(),
        **summary,
    }
    if lead:
        print(json.dumps(report))
    return report


def _builders(args, common: dict, log):
    """(training builder, held-out builder or None): SFT samples, or preference pairs for dpo / reward."""
    from glm_jax.preference import preference_builder  # deferred: JAX, so --help stays fast
    from glm_jax.sft import SFTBuilder

    if args.objective == "sft":
        train = SFTBuilder.from_files(args.data, seed=args.seed, mix=_mix(args.mix), **common)
        held_out = lambda: SFTBuilder.from_files(  # noqa: E731
            args.eval_data, seed=args.seed, shuffle=False, limit=args.eval_limit or None, **common
        )
    else:
        if args.mix or args.last_turn_only:
            from glm_jax.config import ConfigError

            raise ConfigError(f"--mix and --last-turn-only are SFT's; --objective {args.objective} reads pairs")
        pairs = {k: v for k, v in common.items() if k != "last_only"}
        train = preference_builder(args.data, seed=args.seed, **pairs)
        held_out = lambda: preference_builder(  # noqa: E731
            args.eval_data, seed=args.seed, shuffle=False, limit=args.eval_limit or None, **pairs
        )
    log(f"train data: {json.dumps(train.stats.summary())}")
    if not args.eval_data:
        return train, None
    evaluation = held_out()
    log(f"held-out data: {json.dumps(evaluation.stats.summary())}")
    return train, evaluation


def _objective(args, builder, eval_builder):
    """The trainer's objective: the token loss for SFT, else a PairObjective sized to the data."""
    if args.objective == "sft":
        from glm_jax.pipeline import TOKEN_LOSS  # deferred: JAX, so --help stays fast

        return TOKEN_LOSS
    from glm_jax.pair_objectives import REWARD, PairObjective  # deferred: JAX, so --help stays fast
    from glm_jax.preference import segments_needed

    return PairObjective(
        REWARD if args.objective == "reward" else args.loss,
        num_segments=segments_needed([builder, eval_builder]),
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        simpo_gamma=args.simpo_gamma,
    )


def _mix(specs: list[str]) -> list[tuple[str, float]]:
    """--mix FILE:SHARE values -> (file, share) pairs; a malformed one is a clear error."""
    from glm_jax.data import DataError  # deferred: JAX, so --help stays fast

    out = []
    for spec in specs:
        path, _, share = spec.rpartition(":")
        try:
            out.append((path, float(share)))
        except ValueError:
            raise DataError(f"--mix {spec!r}: expected FILE:SHARE, e.g. general.json:0.2") from None
        if not os.path.isfile(path):
            raise DataError(f"--mix {spec!r}: no file {path!r}")
    return out


def _check_merge(peft, base_config):
    """--merge on a base it cannot merge into (LoRA into quantized weights) is an error before
    training, not after: the merge traced on the model's shapes, nothing computed."""
    import flax.linen as nn  # deferred: JAX, so --help stays fast
    import jax

    from glm_jax.model import abstract_params
    from glm_jax.peft import merge_adapters

    config = peft.model_config(base_config)
    jax.eval_shape(lambda params: merge_adapters(params, config)[0], nn.meta.unbox(abstract_params(config)))


def _check_resume(ckpt_dir, peft, identity):
    """A run folder from another method or base is an error, not a silent mix."""
    from glm_jax.checkpoints import CheckpointError, Checkpoints

    if not os.path.isdir(ckpt_dir):
        return
    ckpt = Checkpoints(ckpt_dir, async_save=False)
    try:
        step = ckpt.latest_step()
        meta = ckpt.restore_meta(step) if step is not None else None
    finally:
        ckpt.close()
    if meta is None:
        return
    if meta.get("peft") != peft.to_dict() or meta.get("base") != identity:
        raise CheckpointError(
            f"{ckpt_dir} holds a run of another method or base ({meta.get('peft', {}).get('method')} "
            f"on {meta.get('base_checkpoint')}); choose another --out or the same flags"
        )


def _replace(out, name, write):
    """Write OUT/name through write(tmp_parent) into a fresh folder, then swap it in. Several
    processes: all write (collectively), process 0 moves the folders."""
    import jax  # deferred: JAX, so --help stays fast

    from glm_jax.checkpoints import sync_processes  # deferred: JAX, so --help stays fast

    lead = jax.process_index() == 0
    tmp = os.path.join(out, f".{name}.new")
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    sync_processes(f"finetune {tmp}")
    write(tmp)
    final = os.path.join(out, name)
    if lead:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(os.path.join(tmp, name), final)
        shutil.rmtree(tmp, ignore_errors=True)
    sync_processes(f"finetune {final}")
    return final


def _folder_bytes(path):
    if not path:
        return None
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


if __name__ == "__main__":
    main()
