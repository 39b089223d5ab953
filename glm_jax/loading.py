"""Loading a trained model to prompt it: config, parameters, family, tokenizer, quantization, adapter.

    model = load_model("runs/default/checkpoints", quantize="int4", adapter="runs/ft")
    model.config, model.params, model.family, model.tokenizer

The checkpoint folder is read by `checkpoints.py` (parameters only, never optimizer state); the
family and tokenizer come from what it records; `quantize` quantizes a float checkpoint's layer
weights as it loads (`quant.py`); `adapter` puts a fine-tuned adapter (`adapters.py`) on the base.
"""

from __future__ import annotations

import dataclasses

import jax

from glm_jax import paths, placement
from glm_jax.adapters import attach
from glm_jax.checkpoints import CheckpointError, read_checkpoint, read_config
from glm_jax.config import ConfigError, GLMConfig
from glm_jax.families import Family, FamilyError, get_family
from glm_jax.peft import check_base
from glm_jax.peft_files import read_adapter
from glm_jax.quant import quantize_params
from glm_jax.sharding import MeshError
from glm_jax.tokenizer import Tokenizer, TokenizerError, check_fits


def quantize_on_load(
    config: GLMConfig,
    params: dict,
    quantize: str | None,
    path: str,
    mesh: jax.sharding.Mesh | None = None,
    consume: bool = False,
    shardings: dict | None = None,
) -> tuple[GLMConfig, dict]:
    """Weight-only quantization of a float checkpoint's layer weights as it loads (quant.py), layer
    by layer and, with `mesh`, already sharded (inference shardings), or with `shardings(config)`
    -> the quantized config's parameter shardings (a trainer's `base_shardings`) in those;
    quantized weights are not quantized again (a clear error)."""
    if quantize and quantize not in ("none", config.quantization):
        if config.quantization != "none":
            raise CheckpointError(
                f"{path} holds {config.quantization} weights already; quantize the float "
                f"checkpoint it came from to get {quantize}"
            )
        config = config.override(quantization=quantize)
        if shardings is not None:
            shardings = shardings(config)
        elif mesh is not None:
            shardings = placement.param_shardings(config, mesh)
        params = quantize_params(params, config, shardings, consume)  # consume: each float stack freed when done
    return config, params


def load_checkpoint(
    path: str, step: int | None = None, quantize: str | None = None, mesh: jax.sharding.Mesh | None = None
) -> tuple[GLMConfig, dict, int]:
    """(config, params, step) from a run's checkpoint folder (its latest step, or `step`) or from
    one step's folder, onto the first device: a training checkpoint, or a quantized serving one
    written by `save_serving`. quantize "int4"/"int8": weight-only quantization of a float
    checkpoint's layer weights (quant.py) as it loads. mesh: every array read straight into its
    inference sharding (`placement`), never staged whole on one device. Clear errors for a
    missing or empty folder, a mesh inference cannot use, or re-quantizing quantized weights."""
    config, params, step, _, path = _read(path, step, mesh)
    config, params = quantize_on_load(config, params, quantize, path, mesh, consume=True)  # read here: ours
    return config, params, step


def _read(path: str, step: int | None, mesh: jax.sharding.Mesh | None):
    """`read_checkpoint`, with the mesh checked for inference first (a clear error naming the axis)."""
    if mesh is not None:
        config = read_config(path)
        try:
            placement.check_inference_mesh(config, mesh)
        except MeshError as e:
            raise CheckpointError(str(e)) from None
    return read_checkpoint(path, step, mesh)


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint with everything needed to prompt it: its family and tokenizer."""

    config: GLMConfig
    params: dict
    step: int
    family: Family
    tokenizer: Tokenizer
    path: str
    mesh: jax.sharding.Mesh | None = None  # the inference mesh the parameters are sharded on; None: one device
    param_bytes: int = 0  # the largest device's share of the parameters, recorded by take_params()
    source: str | None = None  # what the checkpoint records it came from (convert.py: the released folder)

    def take_params(self) -> dict:
        """The parameters, handed over: this object no longer holds them, so a consumer that
        re-lays them out (`Generator(..., consume=True)`) leaves one copy on the devices."""
        params, self.params = self.params, None
        self.param_bytes = placement.bytes_per_device(params)
        return params

    def placement_summary(self) -> dict:
        """What the scripts' JSON summaries report of where the model lives: the mesh's axis sizes
        and the largest device's share of the parameters as loaded (bytes)."""
        axes = dict(self.mesh.shape) if self.mesh is not None else {"data": 1, "stage": 1, "tensor": 1}
        return {
            "mesh": {name: int(size) for name, size in axes.items()},
            "param_bytes_per_device": self.param_bytes
            if self.params is None
            else placement.bytes_per_device(self.params),
        }


def load_model(
    path: str,
    quantize: str | None = None,
    tokenizer_file: str | None = None,
    family: str | None = None,
    step: int | None = None,
    adapter: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    shardings=None,
) -> LoadedModel:
    """`load_checkpoint` plus the family and tokenizer the checkpoint records (a checkpoint from
    before families were recorded is ours, `glm`). tokenizer_file / family override them. A
    tokenizer whose ids do not fit the embedding is a clear error. adapter: a fine-tuned
    adapter folder (adapters.py) put on the (quantized) base, after checking it is its base, or a
    peft LoRA folder made on a released layout (peft_files.py; its names and shapes checked).
    mesh: the model loaded onto a (data, tensor) mesh for inference (`load_checkpoint`).
    shardings: a function of the checkpoint's config -> NamedShardings over its parameter paths
    (a fine-tuning trainer's `train.base_shardings`): every array read straight into them (and
    quantized into them), so no device holds the whole model; any mesh, stages included."""
    if shardings is not None:
        config, params, step, meta, path = read_checkpoint(path, step, shardings=shardings(read_config(path, step)))
    else:
        config, params, step, meta, path = _read(path, step, mesh)
    try:
        model_family = get_family(family or meta.get("family") or "glm")
        if tokenizer_file is None and meta.get("tokenizer"):
            tokenizer_file = paths.join(path, meta["tokenizer"])
        tokenizer = model_family.load_tokenizer(None if tokenizer_file is None else paths.local_file(tokenizer_file))
        check_fits(tokenizer, config.padded_vocab_size, f"the checkpoint {path}")
    except (FamilyError, TokenizerError) as e:
        raise CheckpointError(str(e)) from None
    if adapter is not None:
        fine_tuned = read_adapter(adapter, config, params)  # a peft folder is read onto the float base
        try:
            if fine_tuned.peft_layout is None:  # ours records its base; a peft folder only its name
                check_base(fine_tuned.base, config, params, step, fine_tuned.path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    config, params = quantize_on_load(config, params, quantize, path, mesh, True, shardings)  # read here: ours
    if adapter is not None:
        if mesh is not None:
            model_config = fine_tuned.peft.model_config(config)
            fine_tuned.params = placement.place(fine_tuned.params, model_config, mesh)
        config, params = attach(fine_tuned, config, params)
    return LoadedModel(config, params, step, model_family, tokenizer, path, mesh, source=meta.get("source"))
