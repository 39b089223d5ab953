"""Reading a compiled program's HLO: collective bytes by kind and mesh axis and executed FLOPs,
loop bodies times their trip counts, against hand counts of small shard_map programs on 8 CPU
devices."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax.collectives import (
    Instruction,
    _groups,
    collective_bytes,
    collective_ops,
    executed_costs,
    executed_flops,
)

ALL = ("data", "stage", "tensor")
ROW = 4 * 16  # bytes of one device's [1, 16] float32 block


def transposed_mesh() -> jax.sharding.Mesh:
    """A 2x2x2 mesh whose device ids are not their positions: a group named by ids would span
    other axes than one named by positions."""
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2).transpose(2, 1, 0)
    return jax.sharding.Mesh(devices, ALL)


def compiled_text(fn, mesh, *shapes) -> str:
    """fn in shard_map over every axis (rows split over all of them), compiled for abstract
    [8 x rows, 16] float32 arrays; int32 scalars are replicated."""
    spec = P(ALL)
    args, specs = [], []
    for shape in shapes:
        on = P() if shape == () else spec
        args.append(
            jax.ShapeDtypeStruct(shape, jnp.int32 if shape == () else jnp.float32, sharding=NamedSharding(mesh, on))
        )
        specs.append(on)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=spec)
    return jax.jit(mapped).lower(*args).compile().as_text()


def test_bytes_by_kind_and_axis_in_a_known_loop():
    mesh = transposed_mesh()

    def step(x):  # x: one device's [1, 16]
        def body(i, c):
            gathered = jax.lax.all_gather(c, "data", tiled=True)  # [2, 16]
            summed = jax.lax.psum(c, "tensor") + jax.lax.psum(c * 2, ("data", "tensor"))
            moved = jax.lax.ppermute(c, "stage", [(0, 1), (1, 0)])
            return summed + moved + gathered[:1] * 0.5

        return jax.lax.fori_loop(0, 5, body, x)

    text = compiled_text(step, mesh, (8, 16))
    report = collective_bytes(text, mesh)
    assert report["bytes"] == {
        "all-gather": {"data": 5 * 2 * ROW},
        "all-reduce": {"tensor": 5 * ROW, "data+tensor": 5 * ROW},
        "collective-permute": {"stage": 5 * ROW},
    }
    assert report["ops"]["all-reduce"] == {"tensor": 5, "data+tensor": 5}
    # by ring algorithms: gather (g - 1) x operand, all-reduce 2 (g - 1) / g x operand
    assert report["wire_bytes"]["all-gather"]["data"] == 5 * ROW
    assert report["wire_bytes"]["all-reduce"]["data+tensor"] == 5 * 1.5 * ROW
    assert report["assumed_trip_counts"] == {}
    ops = collective_ops(text, mesh)
    assert {(op.kind, op.axis, op.shape, op.executions) for op in ops} == {
        ("all-gather", "data", "f32[1,16]", 5),
        ("all-reduce", "tensor", "f32[1,16]", 5),
        ("all-reduce", "data+tensor", "f32[1,16]", 5),
        ("collective-permute", "stage", "f32[1,16]", 5),
    }
    assert all(len(op.loops) == 1 and op.loops[0].trip_count == 5 and op.loops[0].known for op in ops)
    # without XLA's known_trip_count the count comes from the condition's constant
    stripped = text.replace('"known_trip_count":{"n":"5"}', '"unknown":{}')
    assert stripped != text and collective_bytes(stripped, mesh)["bytes"] == report["bytes"]


def test_nested_and_dynamic_loops_multiply():
    mesh = transposed_mesh()
    weight = jnp.ones((16, 32), jnp.float32)

    def step(x, n):  # n: a trip count known only at run time
        def inner(i, c):
            y = jnp.tanh(c @ weight) @ weight.T  # 2 dots of 2 x 1 x 16 x 32 FLOPs
            return jax.lax.psum(y, "tensor") + c

        return jax.lax.fori_loop(0, n, lambda j, c: jax.lax.fori_loop(0, 3, inner, c), x)

    text = compiled_text(step, mesh, (8, 16), ())
    report = collective_bytes(text, mesh, trip_count_default=4)
    assert report["bytes"] == {"all-reduce": {"tensor": 4 * 3 * ROW}}
    assert list(report["assumed_trip_counts"].values()) == [4]
    assert collective_bytes(text, mesh)["bytes"] == {"all-reduce": {"tensor": 3 * ROW}}  # once, and said so
    dots = 2 * (2 * 1 * 16 * 32)
    assert executed_flops(text, trip_count_default=4) == 4 * 3 * dots
    assert executed_costs(text)["flops"] == 3 * dots
    (op,) = collective_ops(text, mesh, trip_count_default=4)
    assert [(loop.trip_count, loop.known) for loop in op.loops] == [(4, False), (3, True)]


def test_conditional_counts_its_busiest_branch():
    mesh = transposed_mesh()
    weight = jnp.ones((16, 16), jnp.float32)

    def step(x, k):
        heavy = lambda c: jnp.tanh(jnp.tanh(c @ weight) @ weight)  # noqa: E731
        light = lambda c: jnp.tanh(c @ weight)  # noqa: E731
        return jax.lax.cond(k > 0, heavy, light, x)

    text = compiled_text(step, mesh, (8, 16), ())
    assert "conditional(" in text
    assert executed_flops(text) == 2 * (2 * 1 * 16 * 16) and executed_costs(text)["conditionals"] == 1


def test_iota_and_explicit_replica_groups():
    def groups(attributes):
        return _groups(Instruction("x", "f32[2]", "all-reduce", (), "", attributes), 8)

    assert groups(", replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert groups(", replica_groups=[4,2]<=[8], to_apply=%add") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups(", replica_groups={{0,4},{1,5}}, to_apply=%add") == [[0, 4], [1, 5]]
    assert groups(", replica_groups={}, to_apply=%add") == [list(range(8))]


ESTIMATE = ',"cost_estimate":{"flops":"1234","transcendentals":"5","bytes_accessed":"6"}'
KERNEL = 'custom_call_target="tpu_custom_call", backend_config={{"custom_call_config":{{"body":"x"{}}}}}'
KERNEL_HLO = f"""HloModule m, entry_computation_layout={{(f32[8,8]{{1,0}})->f32[8,8]{{1,0}}}}

ENTRY %main (p: f32[8,8]) -> f32[8,8] {{
  %p = f32[8,8]{{1,0}} parameter(0)
  %k = f32[8,8]{{1,0}} custom-call(%p), {KERNEL.format(ESTIMATE)}
  %u = f32[8,8]{{1,0}} custom-call(%k), {KERNEL.format("")}
  ROOT %d = f32[8,8]{{1,0}} dot(%u, %u), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}
"""


def test_a_kernel_counts_its_cost_estimate_and_one_without_is_listed():
    costs = executed_costs(KERNEL_HLO)
    assert costs["flops"] == 1234 + 2 * 8 * 8 * 8  # Mosaic writes the estimate's numbers quoted
    assert costs["uncosted_kernels"] == {"tpu_custom_call": 1}
