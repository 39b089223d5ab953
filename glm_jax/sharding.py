"""Where every array lives: the (data, stage, tensor[, context]) mesh, logical-axis rules,
placement, processes.

Mesh specs: "8x4" is 8 pipeline stages x 4 tensor shards with data parallel over the remaining
devices; "DxPxT" names all three; "DxPxTxC" adds a `context` axis of C devices that splits every
sequence (context parallelism: activations by position, attention with its queries split and its
keys / values all-gathered, `layers.SelfAttention`). 2- and 3-part specs make a mesh without a
`context` axis. The model names logical axes only; `LOGICAL_RULES` below is the one table that
maps them onto the mesh. How layers are laid over `stage` (slots) and run (schedules) is
`pipeline.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax.config import GLMConfig

AXES = ("data", "stage", "tensor")  # every mesh's axes; a 4-part spec adds CONTEXT after them
CONTEXT = "context"

# logical axis -> mesh axis (t5x-style table). `kv_heads` falls back to replicated when the
# tensor axis does not divide it (chatglm2-6b's 2 KV groups on 4 shards). The positions of a
# sequence go over `context` only on a mesh that has that axis (`rules_for`).
LOGICAL_RULES = (
    ("batch", "data"),
    ("layers", "stage"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", None),
    ("length", CONTEXT),  # positions of activations inside a layer (queries, FFN)
    ("sequence", CONTEXT),  # the residual stream's positions (and `tensor` with sequence parallelism)
    ("kv_length", None),  # the keys / values attention reads: whole on every context shard
    ("head_dim", None),
    ("glu", None),
)


class MeshError(ValueError):
    """A mesh the devices or the model cannot be split into; the message names axis and number."""


# ---- the mesh -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int | None  # None: whatever the devices leave
    stage: int
    tensor: int
    context: int | None = None  # None: no context axis (a 2- or 3-part spec)

    @property
    def axes(self) -> tuple[str, ...]:
        return AXES + ((CONTEXT,) if self.context is not None else ())

    @property
    def dims(self) -> tuple[int, ...]:
        """The axis sizes in `axes` order (data resolved or not)."""
        return (self.data, self.stage, self.tensor) + ((self.context,) if self.context is not None else ())

    def _describe(self) -> str:
        shown = f"stage={self.stage} x tensor={self.tensor}"
        return shown + (f" x context={self.context}" if self.context is not None else "")

    def resolve(self, n_devices: int) -> MeshShape:
        per_replica = self.stage * self.tensor * (self.context or 1)
        if self.data is None:
            if n_devices % per_replica:
                raise MeshError(
                    f"{n_devices} devices cannot hold {self._describe()} "
                    f"= {per_replica} per data replica ({n_devices} % {per_replica} != 0)"
                )
            return dataclasses.replace(self, data=n_devices // per_replica)
        if self.data * per_replica != n_devices:
            raise MeshError(
                f"mesh data={self.data} x {self._describe()} needs {self.data * per_replica} devices, {n_devices} given"
            )
        return self

    @property
    def size(self) -> int:
        return (self.data or 1) * self.stage * self.tensor * (self.context or 1)


def parse_mesh(spec: str) -> MeshShape:
    """'8x4' -> stage 8, tensor 4, data from the devices; '2x8x4' -> data 2, stage 8, tensor 4;
    '2x1x4x8' -> data 2, stage 1, tensor 4, context 8 (each sequence split over 8 devices)."""
    if not re.fullmatch(r"\s*\d+(\s*x\s*\d+){1,3}\s*", spec or ""):
        raise MeshError(
            f"--mesh {spec!r}: expected PxT (stages x tensor shards), DxPxT or DxPxTxC (C: context "
            "shards splitting each sequence), e.g. 8x4, 2x8x4 or 2x1x4x8"
        )
    dims = [int(d) for d in spec.lower().replace(" ", "").split("x")]
    if min(dims) < 1:
        raise MeshError(f"--mesh {spec!r}: every axis needs at least 1 device")
    return MeshShape(None, *dims) if len(dims) == 2 else MeshShape(*dims)


def devices_needed(spec: str) -> int:
    """Devices a mesh spec needs at least (stage x tensor x context, times data when given)."""
    return parse_mesh(spec).size


def make_mesh(spec: str | MeshShape, devices=None) -> jax.sharding.Mesh:
    """A (data, stage, tensor) mesh, or (data, stage, tensor, context) for a 4-part spec, over
    `devices` (default: all), laid onto the hardware by `device_grid`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (parse_mesh(spec) if isinstance(spec, str) else spec).resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(shape.axes)
    return jax.sharding.Mesh(device_grid(shape.dims, devices), shape.axes, axis_types=auto)


def _link_order(n_axes: int) -> tuple[int, ...]:
    """Mesh axes (data, stage, tensor[, context]) from the least to the most talkative: context's
    per-layer key / value gathers sit between the stage sends and tensor's all-reduces. Its own
    inverse (a swap of the last two axes or nothing)."""
    return (0, 1, 3, 2) if n_axes == 4 else (0, 1, 2)


def device_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """The [data, stage, tensor(, context)] array of devices. The axes are laid out by how much
    they talk: tensor (two all-reduces per layer, on the critical path) innermost, so it gets the
    fastest links; then context (a key / value all-gather per layer, and its reduce-scatter in the
    backward); stage (neighbour sends) next; data (one gradient reduction per step) outermost.
    - TPU, one slice: the devices' torus coordinates (`mesh_utils.create_device_mesh`), physical
      axes split when a mesh axis needs part of one (v4 / v5p / v6e pods for 24x8x4 and the like).
    - TPU, several slices: ICI inside a slice, data parallel across slices over the data-center
      network (`create_hybrid_device_mesh`).
    - GPU on several hosts: tensor (then stage) inside a host's NVLink domain, the rest across
      hosts (`host_split`).
    - otherwise (CPU, one GPU host): jax.make_mesh's order."""
    order = _link_order(len(shape))
    laid = device_grid_by_links(tuple(shape[i] for i in order), devices)
    return np.transpose(laid, order)


def device_grid_by_links(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """`device_grid` for a shape already in link order (the most talkative axis last)."""
    from jax.experimental import mesh_utils

    platform = devices[0].platform
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if platform == "tpu" and len(slices) > 1:
        if shape[0] % len(slices):
            raise MeshError(
                f"{len(slices)} TPU slices need the data axis ({shape[0]}) to be a multiple of "
                f"{len(slices)}: data parallelism runs across slices"
            )
        inner = (shape[0] // len(slices),) + tuple(shape[1:])
        outer = (len(slices),) + (1,) * (len(shape) - 1)
        return mesh_utils.create_hybrid_device_mesh(inner, outer, devices, allow_split_physical_axes=True)
    if platform == "tpu":
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    hosts = sorted({d.process_index for d in devices})
    if platform == "gpu" and len(hosts) > 1:
        inner, outer = _host_split_by_links(shape, len(devices) // len(hosts), "x".join(map(str, shape)))
        return mesh_utils.create_hybrid_device_mesh(inner, outer, devices, process_is_granule=True)
    names = tuple(f"axis{i}" for i in range(len(shape)))
    return np.asarray(jax.make_mesh(shape, names, devices=devices).devices)


def host_split(shape: tuple[int, ...], per_host: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inside one host, across hosts) factors of a (data, stage, tensor[, context]) mesh: tensor
    inside a host, then as much of context, then of stage, then of data, as the host's devices
    hold."""
    order = _link_order(len(shape))
    inner, outer = _host_split_by_links(tuple(shape[i] for i in order), per_host, "x".join(map(str, shape)))
    return tuple(inner[i] for i in order), tuple(outer[i] for i in order)


def _host_split_by_links(
    shape: tuple[int, ...], per_host: int, label: str = ""
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`host_split` of a shape in link order: its last (tensor) axis first. label: the mesh as
    its spec writes it, for the error."""
    t = shape[-1]
    if per_host % t and t % per_host:
        raise MeshError(
            f"a tensor axis of {t} does not fit hosts of {per_host} devices: choose a divisor or a "
            f"multiple of {per_host}"
        )
    inner = [0] * len(shape)
    inner[-1] = min(t, per_host)
    room = per_host // inner[-1]
    for i in reversed(range(len(shape) - 1)):
        inner[i] = math.gcd(shape[i], room)
        room //= inner[i]
    if math.prod(inner) != per_host:
        raise MeshError(f"mesh {label or 'x'.join(map(str, shape))} cannot fill hosts of {per_host} devices")
    return tuple(inner), tuple(n // i for n, i in zip(shape, inner))


def axis_size(mesh: jax.sharding.Mesh, name: str) -> int:
    """The size of a mesh axis; `context` is 1 on a mesh without one."""
    if name == CONTEXT and CONTEXT not in mesh.axis_names:
        return 1
    return int(mesh.shape[name])


def has_context(mesh) -> bool:
    """Whether `mesh` (a Mesh or an AbstractMesh) has a `context` axis (a 4-part spec)."""
    return CONTEXT in mesh.axis_names


def rules_for(config: GLMConfig, mesh: jax.sharding.Mesh, fsdp: bool = False, sequence_parallel: bool = False) -> tuple:
    """LOGICAL_RULES adjusted to this config on this mesh (KV replication; FSDP over `data`;
    positions over `context` where the mesh has it, else whole; sequence parallelism: the residual
    stream's positions over `tensor` too, Megatron's scheme, inside each context chunk)."""
    t = axis_size(mesh, "tensor")
    context = CONTEXT if has_context(mesh) else None
    rules = []
    for logical, physical in LOGICAL_RULES:
        if logical == "kv_heads" and config.num_kv_heads % t:
            physical = None  # replicate KV heads rather than split a head
        if logical == "embed" and fsdp:
            physical = "data"
        if physical == CONTEXT:
            physical = context
        if logical == "sequence" and sequence_parallel:
            physical = (context, "tensor") if context else "tensor"
        rules.append((logical, physical))
    return tuple(rules)


def check_splittable(
    config: GLMConfig,
    mesh: jax.sharding.Mesh,
    global_batch: int | None = None,
    microbatches: int | None = None,
    seq_len: int | None = None,
) -> None:
    """Fail fast, naming the axis and the number that does not divide."""
    t, s, d = axis_size(mesh, "tensor"), axis_size(mesh, "stage"), axis_size(mesh, "data")
    problems = []
    if seq_len is not None and seq_len % axis_size(mesh, CONTEXT):
        problems.append(f"context axis of {axis_size(mesh, CONTEXT)} does not divide the sequence length {seq_len}")
    for what, n in (
        ("num_attention_heads", config.num_attention_heads),
        ("inner_hidden_size (FFN width)", config.inner_hidden_size),
        ("padded vocab", config.padded_vocab_size),
    ):
        if n % t:
            problems.append(f"tensor axis of {t} does not divide {what}={n}")
    if config.num_kv_heads % t and t % config.num_kv_heads:
        problems.append(f"tensor axis of {t} neither divides nor is a multiple of num_kv_heads={config.num_kv_heads}")
    if config.num_layers < s:
        problems.append(f"stage axis of {s} is more than num_layers={config.num_layers}")
    if global_batch is not None:
        if global_batch % d:
            problems.append(f"data axis of {d} does not divide the global batch {global_batch}")
        elif microbatches and global_batch % (microbatches * d):
            problems.append(
                f"{microbatches} microbatches x data axis of {d} do not divide the global batch {global_batch}"
            )
    if problems:
        shown = f"data={d} x stage={s} x tensor={t}" + (
            f" x context={axis_size(mesh, CONTEXT)}" if has_context(mesh) else ""
        )
        raise MeshError("cannot split this model on mesh " + shown + ": " + "; ".join(problems))


# ---- where parameters and optimizer state live ----------------------------------------------------
def logical_specs(boxed_tree) -> Any:
    """Tree of logical PartitionSpecs from a tree of nn.LogicallyPartitioned (abstract) params."""
    return nn.get_partition_spec(boxed_tree)


def named_shardings(boxed_tree, mesh: jax.sharding.Mesh, rules) -> Any:
    """Tree of NamedShardings for parameters carrying logical axis names."""
    return nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)


def zero1_sharding(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """ZeRO-1: the same array sharded further over `data` on its largest free dimension that
    the data axis divides (optimizer moments follow their parameter otherwise)."""
    spec = zero1_spec(sharding.spec, shape, axis_size(sharding.mesh, "data"))
    return sharding if spec is None else NamedSharding(sharding.mesh, spec)


def zero1_spec(spec: P, shape: tuple[int, ...], data: int) -> P | None:
    """`spec` with `data` on the largest free dimension of `shape` that `data` divides; None when
    it stays as it is (data 1, already over `data`, or no dimension fits)."""
    spec = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for s in spec if s for a in ((s,) if isinstance(s, str) else s)}
    if data == 1 or "data" in used:
        return None
    free = [i for i, s in enumerate(spec) if s is None and shape[i] % data == 0]
    if not free:
        return None
    spec[max(free, key=lambda j: shape[j])] = "data"
    return P(*spec)


def per_device_bytes(shapes, shardings) -> float:
    """Bytes one device holds of a tree of ShapeDtypeStructs under these NamedShardings."""
    total = 0.0
    for a, s in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        total += float(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
    return total


def abstract_tree(shapes, shardings):
    """ShapeDtypeStructs carrying these shardings (compile or restore targets, nothing allocated)."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[B, S] batch arrays: rows over `data`, columns (positions) over `context` where the mesh
    has it. A process builds whole rows (`rows_held`); each device takes its columns of them."""
    return NamedSharding(mesh, P("data", CONTEXT if has_context(mesh) else None))


# ---- which rows of a batch each process builds ----------------------------------------------------
def rows_held(sharding: NamedSharding, rows: int, devices=None) -> np.ndarray:
    """The rows of a [rows, ...] batch in `sharding` that `devices` (default: this process's) hold:
    ascending global row indices. Processes holding parts of one data replica hold the same rows."""
    mesh = sharding.mesh
    d = axis_size(mesh, "data")
    if rows % d:
        raise MeshError(f"a batch of {rows} rows cannot be split over the data axis of {d} (mesh {dict(mesh.shape)})")
    mine = set(mesh.local_devices if devices is None else devices)
    indices = sharding.devices_indices_map((rows, axis_size(mesh, CONTEXT)))
    held = [np.arange(rows)[index[0]] for device, index in indices.items() if device in mine]
    return np.unique(np.concatenate(held))


def microbatch_rows_held(sharding: NamedSharding, microbatch_rows: int, microbatches: int, devices=None) -> np.ndarray:
    """The rows of every microbatch that `devices` (default: this process's) hold when a batch of
    `microbatches` microbatches of `microbatch_rows` rows is laid out for
    `pipeline.split_microbatches` (row r of the batch is row r // M of microbatch r % M): ascending
    rows of a microbatch, the same for each."""
    held = rows_held(sharding, microbatch_rows * microbatches, devices)
    unique = np.unique(held // microbatches)
    if len(held) != len(unique) * microbatches:  # a data shard would have to start inside a row's microbatches
        raise MeshError(
            f"{microbatches} microbatches of {microbatch_rows} rows cannot be split over the data axis of "
            f"{axis_size(sharding.mesh, 'data')}: each data shard needs whole rows of every microbatch"
        )
    return unique


# ---- many processes -------------------------------------------------------------------------------
DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(environ=None) -> bool:
    """`jax.distributed.initialize` when JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID are set (CPU processes talk through gloo). Returns whether it initialized."""
    env = os.environ if environ is None else environ
    present = [k for k in DIST_ENV if env.get(k)]
    if not present:
        return False
    if len(present) != len(DIST_ENV):
        missing = sorted(set(DIST_ENV) - set(present))
        raise MeshError(f"multi-process run needs {', '.join(DIST_ENV)}; missing {', '.join(missing)}")
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]),
        process_id=int(env["JAX_PROCESS_ID"]),
    )
    return True


def global_batch(local: dict, mesh: jax.sharding.Mesh) -> dict:
    """This process's rows of a batch (`rows_held`, ascending; one process: all) [n, S] -> global
    arrays [B, S] sharded by `batch_sharding` (rows over `data`, positions over `context`). B is
    n x the data shards over the shards this process holds; each device gets its rows (and its
    columns of them) from its own process (`make_array_from_callback`)."""
    sharding = batch_sharding(mesh)
    arrays = {k: np.asarray(v) for k, v in local.items() if np.ndim(v) == 2}
    n, seq_len = next(iter(arrays.values())).shape
    c = axis_size(mesh, CONTEXT)
    if seq_len % c:
        raise MeshError(f"sequences of {seq_len} positions cannot be split over the context axis of {c}")
    d = axis_size(mesh, "data")
    shards = len(rows_held(sharding, d))
    if n % shards:
        raise MeshError(f"process {jax.process_index()} holds {shards} of {d} data shards: {n} rows do not split")
    rows = n * d // shards
    held = rows_held(sharding, rows)
    position = np.full(rows, -1)
    position[held] = np.arange(len(held))

    def place(values):
        return jax.make_array_from_callback(
            (rows,) + values.shape[1:], sharding, lambda index: values[position[index[0]]][:, index[1]]
        )

    return {k: place(v) for k, v in arrays.items()}


def simulate_cpu_devices(n: int) -> bool:
    """Ask for n CPU devices before JAX starts its backends (only the CPU platform is affected:
    on a machine with accelerators the mesh uses those). Returns whether it asked."""
    if n <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    jax.config.update("jax_num_cpu_devices", n)
    return True
