"""Checkpoints: training state in its training layout, serving checkpoints, and loading models.

A step folder holds four orbax items:
- `params`: the trainable parameters as the run holds them (layers in the slot layout of its
  pipeline, `meta.layout`), every array in its training sharding: each process writes its own
  shards, nothing is gathered;
- `opt_state`: the optimizer state (ZeRO-1 moments sharded over `data`), likewise;
- `train`: step, loss scale, rng, skip counters;
- `meta` (JSON): config, data iterator state, layout, family, tokenizer, optimizer settings.

`restore_state` reads them straight into the trainer's shardings (each device reads its own
shards) when the pipeline has the same stage count; onto another stage count it reads the saved
slots sharded over the new mesh and re-slots them in one jitted function on the devices. A
serving load (`load_checkpoint`, `load_model`) reads `params` and `meta` only, never the
optimizer state. A serving checkpoint (`save_serving`: float or quantized parameters, no
optimizer state) has the same folder layout, so every loader takes both.

Folders are local paths or URLs: a URL goes to orbax untouched (its own gs:// / s3:// support,
through etils.epath), a file:// URL is its local path; schemes epath does not take (memory://)
are refused by name.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from glm_jax import paths, pipeline, placement
from glm_jax.config import GLMConfig
from glm_jax.peft import PeftConfig, split_shapes
from glm_jax.tokenizer import sidecar_files

TRAIN_ITEMS = ("params", "opt_state", "train")


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run (another config, a damaged folder); says what."""


def checkpoint_path(directory: str) -> str:
    """A checkpoint folder as orbax takes it: a local path made absolute (file:// read as one), a
    URL of a scheme etils.epath serves (gs://, s3://, az://) exactly as given."""
    directory = str(directory)
    if directory.startswith("file://"):
        return os.path.abspath(directory[len("file://") :])
    if not paths.is_url(directory):
        return os.path.abspath(directory)
    from etils import epath

    try:
        epath.Path(directory)
    except KeyError:
        scheme = directory.split("://", 1)[0]
        raise CheckpointError(
            f"checkpoint folder {directory}: orbax (etils.epath) does not serve {scheme}:// URLs; "
            "use a local path or gs://, s3://, az://"
        ) from None
    return directory


class Checkpoints:
    """orbax CheckpointManager over a run folder: async saves, keep the last K, atomic steps.

    A save is written to a temporary folder and renamed when complete, so a crash mid-save
    leaves the previous checkpoints intact and `latest_step` never names a partial one (on an
    object store orbax marks a step complete instead). `directory`: a local path or a URL
    (`checkpoint_path`).
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_path(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=TRAIN_ITEMS + ("meta",))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, items: dict, meta: dict) -> None:
        """items: some of TRAIN_ITEMS -> pytrees of jax arrays (written in their shardings)."""
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, targets: dict) -> dict:
        """targets: item name -> abstract tree (ShapeDtypeStructs with shardings); reads only those."""
        args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {k: restored[k] for k in targets}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_config_matches(saved: dict, config: GLMConfig, where: str) -> None:
    """A clear error naming every field where a checkpoint's config differs from this run's."""
    mine = config.to_dict()
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    structural = {
        k: d
        for k, d in diff.items()
        if k not in ("hidden_dropout", "attention_dropout", "remat_policy", "attention_impl", "embedding_shrink_alpha")
    }
    if structural:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(structural.items()))
        raise CheckpointError(
            f"checkpoint {where} was trained with another model config ({lines}); "
            "use the same --preset/--set or another --ckpt-dir"
        )


# ---- the layout the layers were saved in ----------------------------------------------------------
def layout(plan: pipeline.PipelinePlan) -> dict:
    """What `meta.layout` records: the pipeline whose slot layout the saved layers are in."""
    return {"stages": plan.stages, "num_layers": plan.num_layers}


def saved_plan(meta: dict, config: GLMConfig) -> pipeline.PipelinePlan:
    """The pipeline whose slot layout a checkpoint's layers are in."""
    return pipeline.PipelinePlan(config.num_layers, int(meta.get("layout", {}).get("stages", 1)))


# ---- serving checkpoints and reading parameters ---------------------------------------------------
TOKENIZER_DIR = "tokenizer"


def sync_processes(name: str) -> None:
    """A barrier over every process (nothing to wait for with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def copy_tokenizer(model_file: str | None, directory: str) -> str | None:
    """Copy a tokenizer file into directory/tokenizer/ (so the checkpoint is self-contained; process
    0 copies) -> its path relative to directory, as checkpoint meta records it; None for ours (in
    the package). A tokenizer.json takes its sidecar files along (tokenizer_config.json,
    special_tokens_map.json, generation_config.json, config.json: its special and stop ids)."""
    if model_file is None:
        return None
    rel = f"{TOKENIZER_DIR}/{os.path.basename(model_file)}"
    directory = checkpoint_path(directory)
    dest = paths.join(directory, rel)
    if jax.process_index() == 0 and os.path.abspath(model_file) != dest:
        sidecars = sidecar_files(model_file) if model_file.endswith(".json") else []
        for src in [model_file, *sidecars]:
            _copy_file(src, paths.join(directory, TOKENIZER_DIR, os.path.basename(src)))
    return rel


def _copy_file(src: str, out: str) -> None:
    """A local file copied to a local path (through a temporary name, renamed) or to a URL."""
    if paths.is_url(out):
        with open(src, "rb") as f, paths.open_raw(out, "wb") as g:
            shutil.copyfileobj(f, g)
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.copyfile(src, out + ".tmp")
    os.replace(out + ".tmp", out)


def _step_folder(path: str, step: int | None) -> tuple[str, int | None]:
    """A run's checkpoint folder or one step's folder (local or a URL) -> (the run folder, the step or None)."""
    path = checkpoint_path(path)
    if not paths.isdir(path):
        raise CheckpointError(
            f"checkpoint folder {path} not found; train one with "
            "`python experiments/pretrain.py` or pass --checkpoint DIR"
        )
    base = paths.basename(path)
    if base.isdigit() and step is None and paths.isdir(paths.join(path, "params")):
        return paths.dirname(path), int(base)
    return path, step


def _latest(ckpt: Checkpoints, path: str, step: int | None) -> int:
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{path} holds no complete checkpoint")
    return step


def read_config(path: str, step: int | None = None) -> GLMConfig:
    """The model config a checkpoint (a run's folder or one step's) records; reads no array."""
    path, step = _step_folder(path, step)
    ckpt = Checkpoints(path, async_save=False)
    try:
        return GLMConfig.from_dict(ckpt.restore_meta(_latest(ckpt, path, step))["config"])
    finally:
        ckpt.close()


def read_checkpoint(
    path: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None, shardings=None
) -> tuple[GLMConfig, dict, int, dict, str]:
    """(config, params, step, meta, checkpoint folder) of a training or serving checkpoint; the
    parameters only (a training checkpoint's optimizer state is never read), on the first device
    or, with `mesh`, read straight into their inference shardings (`placement.param_shardings`),
    or with `shardings` (NamedShardings over a model's parameter paths, the checkpoint's among
    them: a trainer's `base_shardings`) straight into those."""
    path, step = _step_folder(path, step)
    ckpt = Checkpoints(path, async_save=False)
    try:
        step = _latest(ckpt, path, step)
        meta = ckpt.restore_meta(step)
        config = GLMConfig.from_dict(meta["config"])
        params = read_params(ckpt, step, meta, config, mesh, shardings)
    finally:
        ckpt.close()
    return config, params, step, meta, path


def read_params(
    ckpt: Checkpoints,
    step: int,
    meta: dict,
    config: GLMConfig,
    mesh: jax.sharding.Mesh | None = None,
    shardings=None,
) -> dict:
    """A step's `params` item in the plain stacked layout, on the first device or, with `mesh`,
    each device reading only its shards of the inference layout, or of `shardings` (a tree
    over the model's paths; `read_checkpoint`). They are the run's trainable parameters: all of
    them, or a fine-tuning method's (meta.peft)."""
    peft = PeftConfig.from_dict(meta["peft"]) if meta.get("peft") else PeftConfig("full")
    plan = saved_plan(meta, config)
    plain = split_shapes(peft, config)[0]
    shapes = jax.eval_shape(lambda t: pipeline.params_to_slots(t, plan), plain)
    if shardings is not None:
        shardings = placement.matching(shardings, plain)
    elif mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, plain)
    else:
        shardings = placement.param_shardings(config, mesh, plain)
    fit = jax.tree_util.tree_map(_fit_rows, shardings, shapes)  # the saved slots may not divide
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, fit)
    slots = ckpt.restore(step, {"params": target})["params"]
    if plan.stages == 1:
        return slots
    return jax.jit(lambda t: pipeline.params_from_slots(t, plan), out_shardings=shardings)(slots)


def _fit_rows(sharding, shape: jax.ShapeDtypeStruct):
    """A NamedSharding with its leading axis replicated where its mesh axes do not divide the
    leading dimension (a saved slot layout read onto another stage count); others as they are."""
    if not isinstance(sharding, jax.sharding.NamedSharding) or not sharding.spec or sharding.spec[0] is None:
        return sharding
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    if shape.shape[0] % int(np.prod([sharding.mesh.shape[a] for a in axes])) == 0:
        return sharding
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec[1:]))


def move_to_device(tree: dict) -> dict:
    """Replace a nested dict's numpy leaves by device arrays in place, one leaf at a time, each
    numpy leaf dropped as soon as it is copied: one copy of the model at any moment (plus a leaf).
    With several processes every leaf that is not already a global array (numpy, or on this
    process's devices alone) becomes one, a copy on each process's first device (what a
    multi-process orbax save takes; the value must be the same on every process)."""
    for key, value in list(tree.items()):
        if isinstance(value, dict):
            move_to_device(value)
        elif jax.process_count() > 1 and (isinstance(value, np.ndarray) or value.is_fully_addressable):
            tree[key] = None
            tree[key] = _one_copy_per_process(np.asarray(value))
            del value
        elif isinstance(value, np.ndarray):
            tree[key] = None
            tree[key] = jnp.asarray(value)
            del value
    return tree


def _one_copy_per_process(value: np.ndarray) -> jax.Array:
    """A global array holding `value` (the same on every process) once on each process's first device."""
    firsts = [jax.local_devices(process_index=p)[0] for p in range(jax.process_count())]
    mesh = jax.sharding.Mesh(np.array(firsts), ("process",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def save_serving(
    path: str,
    config: GLMConfig,
    params: dict,
    step: int,
    source: str,
    family: str = "glm",
    tokenizer_file: str | None = None,
    extra: dict | None = None,
) -> None:
    """A serving checkpoint: parameters (float or quantized, no optimizer state), their config,
    the family and a copy of the tokenizer file, in the training checkpoints' folder layout, so
    `load_checkpoint` / `load_model` and every script take it. Written beside `path` and renamed
    into place when complete: a failure leaves no half-written folder. `path` must not exist yet
    (or be empty). Pass jax arrays (`move_to_device`): orbax copies numpy leaves before writing.
    Several processes: every process calls it (each writes its shards), process 0 moves the folder.
    A URL (gs://, s3://) is written in place: an object store renames by copying, and orbax marks
    the step complete only once it is (a loader never reads a half-written step)."""
    path = checkpoint_path(path)
    if paths.exists(path) and (not paths.isdir(path) or paths.listdir(path)):
        raise CheckpointError(f"{path} exists and is not empty; remove it or choose another output folder")
    if paths.is_url(path):
        _write_serving(path, config, params, step, source, family, tokenizer_file, extra)
        return
    lead = jax.process_index() == 0
    pid = os.getpid() if jax.process_count() == 1 else int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid())))
    tmp = f"{path}.partial-{pid}"
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
    sync_processes(f"save_serving {tmp}")
    try:
        _write_serving(tmp, config, params, step, source, family, tokenizer_file, extra)
        sync_processes(f"save_serving written {tmp}")
        if lead:
            if os.path.isdir(path):
                os.rmdir(path)
            os.replace(tmp, path)
    finally:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
    sync_processes(f"save_serving done {tmp}")  # the folder is in place for every process


def _write_serving(
    folder: str,
    config: GLMConfig,
    params: dict,
    step: int,
    source: str,
    family: str,
    tokenizer_file: str | None,
    extra: dict | None,
) -> None:
    """`save_serving`'s contents written into `folder`: the tokenizer copy and one orbax step."""
    rel = copy_tokenizer(tokenizer_file, folder)
    ckpt = Checkpoints(folder, keep=1, async_save=False)
    try:
        ckpt.save(
            step,
            {"params": params},
            {
                "config": config.to_dict(),
                "serving": True,
                "source": source,
                "family": family,
                "tokenizer": rel,
                "layout": {"stages": 1},
                **(extra or {}),
            },
        )
    finally:
        ckpt.close()
