"""Where inference puts things on a mesh: parameters, batch rows and the KV cache.

Inference uses the mesh's `data` and `tensor` axes (a stage axis larger than 1 is an error: the
pipeline schedules are for training). Parameters follow the same logical-axis rules as training
(`sharding.rules_for`): heads / kv_heads / mlp / vocab over `tensor` (KV heads replicated when
`tensor` does not divide them), everything else replicated; quantized weights carry their float
kernels' axes. Rows (prompts, beams, slots, scored rows) go over `data`, padded to a multiple of
it; the KV cache [B, M, K, D] is split by rows over `data` and by KV heads over `tensor`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax import sharding as sh
from glm_jax.config import GLMConfig
from glm_jax.model import abstract_params


def check_inference_mesh(config: GLMConfig, mesh: jax.sharding.Mesh) -> None:
    """A clear error (sharding.MeshError) for a mesh inference cannot use, naming the axis."""
    stages, tensor = sh.axis_size(mesh, "stage"), sh.axis_size(mesh, "tensor")
    if stages != 1:
        raise sh.MeshError(
            f"inference runs on the data and tensor axes; this mesh has a stage axis of {stages}: "
            f"use --mesh 1x{tensor} (or Dx1x{tensor})"
        )
    if sh.axis_size(mesh, sh.CONTEXT) != 1:
        raise sh.MeshError(
            f"inference runs on the data and tensor axes; this mesh has a context axis of "
            f"{sh.axis_size(mesh, sh.CONTEXT)} (context parallelism is for training): use --mesh 1x{tensor} "
            f"(or Dx1x{tensor})"
        )
    if tensor > config.num_attention_heads:
        raise sh.MeshError(
            f"a tensor axis of {tensor} is larger than num_attention_heads={config.num_attention_heads}: "
            "a shard needs at least one whole head"
        )
    sh.check_splittable(config, mesh)


def param_shardings(config: GLMConfig, mesh: jax.sharding.Mesh, tree=None):
    """NamedShardings for the model's parameter tree (or for `tree`, a subtree of it with the
    same paths: an adapter's trainable part)."""
    specs = sh.named_shardings(abstract_params(config), mesh, sh.rules_for(config, mesh))
    if tree is None:
        return specs
    return matching(specs, tree)


def matching(specs, tree):
    """The part of `specs` (a tree over a model's parameter paths) at the paths `tree` has."""
    if isinstance(tree, dict):
        return {key: matching(specs[key], value) for key, value in tree.items()}
    return specs


def place(params, config: GLMConfig, mesh: jax.sharding.Mesh):
    """params (on one device or the host; stacked, or in `generate.serving_params`' per-layer
    layout) -> the same tree sharded on `mesh` by the rules. Arrays already there are not moved."""
    layers = params.get("layers")
    if not isinstance(layers, (list, tuple)):
        return jax.device_put(params, param_shardings(config, mesh, params))
    outer = {key: value for key, value in params.items() if key != "layers"}
    per_layer = layer_shardings(config, mesh)
    return {
        **jax.device_put(outer, param_shardings(config, mesh, outer)),
        "layers": tuple(jax.device_put(layer, matching(per_layer, layer)) for layer in layers),
    }


def layer_shardings(config: GLMConfig, mesh) -> dict:
    """The shardings of one layer's tree in `generate.serving_params`' per-layer layout: the
    stacked `layers` shardings without their leading layer axis. mesh: a Mesh or an AbstractMesh."""
    stacked = param_shardings(config, mesh)["layers"]
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, P(*s.spec[1:])), stacked)


def padded_rows(rows: int, mesh: jax.sharding.Mesh | None) -> int:
    """Rows padded up to a multiple of the data axis (so any number of prompts runs on any mesh)."""
    data = 1 if mesh is None else sh.axis_size(mesh, "data")
    return -(-rows // data) * data


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """Repeat the first row until `array` has `rows` rows (padding rows are computed, then dropped)."""
    extra = rows - array.shape[0]
    return array if extra <= 0 else np.concatenate([array, np.repeat(array[:1], extra, axis=0)])


def cache_sharding(config: GLMConfig, mesh: jax.sharding.Mesh) -> NamedSharding:
    """A KV cache buffer [B, M, K, D]: rows over `data`, KV heads over `tensor` when it divides them."""
    tensor = sh.axis_size(mesh, "tensor")
    heads = "tensor" if config.num_kv_heads % tensor == 0 else None
    return NamedSharding(mesh, P("data", None, heads, None))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def bytes_per_device(tree) -> int:
    """The largest device's share of a tree of (sharded) arrays, replicated parts counted in full."""
    per_device: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)
