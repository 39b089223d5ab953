"""What a compiled program communicates and computes per step, read from its optimized HLO text
(`compiled.as_text()`): collective bytes by kind and mesh axis, and executed matmul FLOPs, with
every while loop's body counted times its trip count.

    summary = collective_bytes(compiled.as_text(), mesh, trip_count_default=22)
    summary["bytes"]["all-gather"]["data"]     # bytes one device all-gathers over `data` a step
    ops = collective_ops(compiled.as_text(), mesh)   # each collective, with the loops around it
    flops = executed_flops(compiled.as_text())       # one device's dot/convolution FLOPs a step

Device ids in an SPMD program's replica groups and source-target pairs are positions in the
mesh's flattened device order (`mesh.devices.flat`), whatever the devices' own ids; a group maps
to the mesh axes whose coordinates vary inside it ("tensor", "data+tensor"; "none" for groups of
one device).

Bytes per kind, per device and per execution (`shape` in a record is the operand's):
  all-gather          result bytes (operand x group size): the gathered array each device ends with
  all-reduce          operand bytes
  reduce-scatter      operand bytes (the unscattered array each device contributes)
  all-to-all          operand bytes
  collective-permute  operand bytes (what a device sends)
`wire_bytes` is what one device sends over links by ring algorithms (group size g): all-gather
(g - 1) x operand, reduce-scatter and all-to-all (g - 1) / g x operand, all-reduce 2 (g - 1) / g
x operand, collective-permute the operand.

An async pair (`all-gather-start` / `-done`, `async-start` / `async-done`) counts once, at its start.
A loop's trip count is XLA's `known_trip_count`, else what its condition, body and start say
(i < N, i += step, i = init, all constants); a loop with neither (a trip count computed at run
time) counts `trip_count_default` times (once if None) and is listed in `assumed_trip_counts`.
Nested loops multiply. Of a conditional's branches the one with the most of what is counted
(bytes, FLOPs) counts, each conditional on its own: an upper bound on every device's step, which
says nothing of how often a branch is skipped (a pipeline tick that idles under `lax.cond` counts
as working). `conditionals` says how many conditionals a step executes, so a reader knows when
the figure is that bound rather than exact.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import re

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
CONDITIONALS = "conditionals"  # the key executed() counts conditionals under

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b(pred|token|bf16|[fsuc]\d+(?:e\d+m\d+\w*)?)\[([\d,<=]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")


# ---- parsing ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result's, e.g. "f32[8,16]{1,0}" or a tuple "(s32[], f32[8,16]{1,0})"
    opcode: str
    operands: tuple[str, ...]  # instruction names
    arguments: str  # the operand list's text (a constant's value)
    attributes: str  # everything after the operand list


@dataclasses.dataclass(frozen=True)
class Computation:
    name: str
    instructions: tuple[Instruction, ...]
    root: str  # the ROOT instruction's name

    @functools.cached_property
    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}

    @functools.cached_property
    def shapes(self) -> dict[str, str]:
        return {i.name: i.shape for i in self.instructions}

    def source(self, name: str) -> Instruction:
        """The instruction a value comes from, through copies, bitcasts and converts."""
        instruction = self.by_name[name]
        while instruction.opcode in ("copy", "bitcast", "convert") and instruction.operands:
            instruction = self.by_name[instruction.operands[0]]
        return instruction


def _closing(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth, opening, closing = 0, text[start], pairs[text[start]]
    for i in range(start, len(text)):
        depth += (text[i] == opening) - (text[i] == closing)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced {opening!r} in HLO line: {text[:120]}")


def _instruction(line: str) -> Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    name, rest = m.group(2), m.group(3)
    end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _closing(rest, op.end() - 1)
    arguments = rest[op.end() : close - 1]
    return Instruction(name, shape, op.group(1), tuple(_NAME.findall(arguments)), arguments, rest[close:])


@functools.lru_cache(maxsize=4)
def parse_module(hlo_text: str) -> tuple[dict[str, Computation], str]:
    """HLO module text -> ({computation name: Computation}, the entry computation's name)."""
    computations, entry, current, body, root = {}, None, None, [], None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and current is None:
            current, body = header.group(2), []
            entry = current if header.group(1) else entry
        elif current is not None and line.startswith("}"):  # "}" or "}, execution_thread=..."
            computations[current] = Computation(current, tuple(body), root or body[-1].name)
            current = root = None
        elif current is not None:
            parsed = _instruction(line)
            if parsed is not None:
                body.append(parsed)
                root = parsed.name if line.lstrip().startswith("ROOT ") else root
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _bits(dtype: str) -> int:
    if dtype in ("pred", "token"):
        return 8 if dtype == "pred" else 0
    if dtype == "bf16":
        return 16
    return int(re.match(r"[fsuc](\d+)", dtype).group(1))


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (dtype, dims) of every array in a shape (a tuple's leaves)."""
    return [
        (dtype, tuple(int(d.removeprefix("<=")) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape)
    ]


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape (a tuple's leaves summed); e.g. 'bf16[4,8]{1,0}' -> 64."""
    return sum(math.prod(dims) * _bits(dtype) / 8 for dtype, dims in _arrays(shape))


def _attribute(attributes: str, key: str) -> str | None:
    """The value of `key=...` in an attribute list: a bracketed value whole, else up to a comma."""
    m = re.search(rf"(?:^|[\s,]){re.escape(key)}=", attributes)
    if not m:
        return None
    start = m.end()
    if attributes[start] in "{[(":
        end = _closing(attributes, start)
        if attributes[start] == "[" and attributes[end : end + 2] == "<=":  # iota groups [a,b]<=[n]T(..)
            end = _closing(attributes, end + 2)
            if attributes[end : end + 2] == "T(":
                end = _closing(attributes, end + 1)
        return attributes[start:end]
    return re.match(r"[^,\s]*", attributes[start:]).group(0)


def _backend_config(instruction: Instruction) -> dict:
    m = re.search(r"backend_config=(\{.*\})", instruction.attributes)
    if not m:
        return {}
    try:
        return json.JSONDecoder().raw_decode(m.group(1))[0]
    except json.JSONDecodeError:
        return {}


# ---- groups and mesh axes ----------------------------------------------------------------------------
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}"
)


def _iota(dims: str, permutation: str | None) -> np.ndarray:
    """XLA's iota device list: arange over dims, transposed by the permutation (if any)."""
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return ids.transpose([int(p) for p in permutation.split(",")]) if permutation else ids


def _mesh_groups(m: re.Match) -> list[list[int]]:
    """Groups in XLA's mesh form: `mesh['axis_0'=8,'axis_1'=24], device_ids=([24,8]T(1,0))
    {'axis_1'}`: the devices (iota, or the given iota list) laid on the named axes, a group
    per coordinate of the axes not in braces."""
    names = re.findall(r"'([^']*)'=\d+", m.group(1))
    sizes = [int(s) for s in re.findall(r"'[^']*'=(\d+)", m.group(1))]
    if ":" in m.group(4):
        raise ValueError(f"replica groups over sub-axes are not read: {m.group(0)}")
    chosen = [names.index(n) for n in re.findall(r"'([^']*)'", m.group(4))]
    ids = _iota(m.group(2), m.group(3)) if m.group(2) else np.arange(math.prod(sizes))
    ids = ids.reshape(sizes).transpose([a for a in range(len(sizes)) if a not in chosen] + chosen)
    return ids.reshape(-1, math.prod(sizes[a] for a in chosen)).tolist()


def _groups(instruction: Instruction, devices: int) -> list[list[int]]:
    """The device groups of a collective: replica_groups (explicit, iota or mesh form), or a
    permute's source-target pairs; an empty replica_groups is one group of every device."""
    pairs = _attribute(instruction.attributes, "source_target_pairs")
    if pairs is not None:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs)]
    on_mesh = _MESH_GROUPS.search(instruction.attributes)
    if on_mesh:
        return _mesh_groups(on_mesh)
    groups = _attribute(instruction.attributes, "replica_groups")
    if groups is None or groups in ("{}", "{{}}"):
        return [list(range(devices))]
    iota = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", groups)
    if iota:
        return _iota(iota.group(2), iota.group(3)).reshape(-1, int(iota.group(1).split(",")[-1])).tolist()
    if not groups.startswith("{"):
        raise ValueError(f"replica groups not read: {groups}")
    return [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", groups)]


def mesh_axes(mesh) -> dict[str, int]:
    """{axis name: size} in the mesh's order, from a Mesh (or an AbstractMesh, or such a dict)."""
    return dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)


def _axis(groups: list[list[int]], axes: dict[str, int]) -> str:
    """The mesh axes whose coordinates vary inside the groups, joined by '+' in mesh order."""
    names, sizes = list(axes), tuple(axes.values())
    varying = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.asarray(group), sizes)).T
        varying |= {names[a] for a in range(len(names)) if len(set(coords[:, a])) > 1}
    return "+".join(n for n in names if n in varying) or "none"


# ---- loops -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Loop:
    name: str  # the while instruction's
    trip_count: int
    known: bool  # from the program; False: trip_count_default assumed
    op_name: str  # its metadata op_name (where in the JAX program it came from)


def _constant(instruction: Instruction) -> int | None:
    """An integer constant's value, else None."""
    if instruction.opcode == "constant" and re.fullmatch(r"-?\d+", instruction.arguments.strip()):
        return int(instruction.arguments)
    return None


def _op_name(instruction: Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', instruction.attributes)
    return m.group(1) if m else ""


def _computation_names(value: str | None) -> list[str]:
    return [] if value is None else [n.lstrip("%") for n in re.findall(r"%?[\w.\-]+", value)]


def _called(instruction: Instruction) -> list[str]:
    """The computations an instruction runs once each time it runs (not a while's or a
    conditional's, not a reducer's, not the other half of an async pair)."""
    if instruction.opcode in ("fusion", "async-start") or (
        instruction.opcode == "call" and "calls=" in instruction.attributes
    ):
        return _computation_names(_attribute(instruction.attributes, "calls"))
    if instruction.opcode == "call":
        return _computation_names(_attribute(instruction.attributes, "to_apply"))
    return []


def _branches(instruction: Instruction) -> list[str]:
    names = _computation_names(_attribute(instruction.attributes, "branch_computations"))
    return names or [
        n
        for key in ("true_computation", "false_computation")
        for n in _computation_names(_attribute(instruction.attributes, key))
    ]


def _kind(instruction: Instruction) -> str | None:
    """The collective an instruction starts (an async pair's start, a sync collective), or None."""
    opcode = instruction.opcode.removesuffix("-start")
    return opcode if opcode in KINDS else None


class _Program:
    """A parsed module and its loops' trip counts."""

    def __init__(self, hlo_text: str, trip_count_default: int | None):
        self.computations, self.entry = parse_module(hlo_text)
        self.default = trip_count_default
        self.assumed: dict[str, int] = {}

    def loop(self, instruction: Instruction, caller: Computation) -> Loop:
        config = _backend_config(instruction)
        known = config.get("known_trip_count", {}).get("n")
        count = int(known) if known is not None else self._counted(instruction, caller, config)
        if count is None:
            count = 1 if self.default is None else int(self.default)
            self.assumed[instruction.name] = count
        return Loop(instruction.name, count, instruction.name not in self.assumed, _op_name(instruction))

    def _unfused(self, computation: Computation, instruction: Instruction) -> tuple[Instruction, list[Instruction]]:
        """An instruction and its operands (as instructions of `computation`), looking through a
        fusion that wraps one instruction of its parameters (XLA:CPU's `wrapped_add`)."""
        if instruction.opcode == "fusion":
            fused = self.computations[_computation_names(_attribute(instruction.attributes, "calls"))[0]]
            inner = fused.by_name[fused.root]
            parameters = [fused.source(o) for o in inner.operands]
            if all(p.opcode == "parameter" for p in parameters):
                return inner, [computation.source(instruction.operands[int(p.arguments)]) for p in parameters]
        return instruction, [computation.source(o) for o in instruction.operands]

    def _counted(self, instruction: Instruction, caller: Computation, config: dict) -> int | None:
        """A trip count from the loop itself: its condition compares (LT or LE) a tuple element
        with a constant, its body adds a constant step to that element, and it starts from a
        constant (or XLA's known_init_step); None when any of these is not so."""
        condition = self.computations[_computation_names(_attribute(instruction.attributes, "condition"))[0]]
        compare, (left, right) = self._unfused(condition, condition.by_name[condition.root])
        direction = _attribute(compare.attributes, "direction")
        if _constant(left) is not None:  # N > i is i < N
            direction, left, right = {"GT": "LT", "GE": "LE"}.get(direction), right, left
        bound = _constant(right)
        if compare.opcode != "compare" or left.opcode != "get-tuple-element" or bound is None:
            return None
        index = int(_attribute(left.attributes, "index"))
        body = self.computations[_computation_names(_attribute(instruction.attributes, "body"))[0]]
        root = body.by_name[body.root]
        if root.opcode != "tuple" or direction not in ("LT", "LE"):
            return None
        update, operands = self._unfused(body, body.source(root.operands[index]))
        steps = [
            _constant(o)
            for o in operands
            if not (o.opcode == "get-tuple-element" and _attribute(o.attributes, "index") == str(index))
        ]
        start = caller.source(instruction.operands[0])
        init = _constant(caller.source(start.operands[index])) if start.opcode == "tuple" else None
        if init is None and "known_init_step" in config:
            init = int(config["known_init_step"]["init"])
        if init is None or update.opcode != "add" or len(steps) != 1 or not steps[0] or steps[0] < 0:
            return None
        return max(0, -(-(bound + (direction == "LE") - init) // steps[0]))

    def executed(self, cost, weight) -> collections.Counter:
        """The sum over every instruction executed in a step of cost(instruction, computation) (a
        Counter): loop bodies times their trip counts, of a conditional's branches the one of
        largest weight(Counter)."""
        totals: dict[str, collections.Counter] = {}

        def total(name: str) -> collections.Counter:
            if name in totals:
                return totals[name]
            out = collections.Counter()
            computation = self.computations[name]
            for i in computation.instructions:
                out.update(cost(i, computation))
                if i.opcode == "while":
                    trips = self.loop(i, computation).trip_count
                    for callee in ("body", "condition"):
                        for n in _computation_names(_attribute(i.attributes, callee)):
                            out.update({k: v * trips for k, v in total(n).items()})
                elif i.opcode == "conditional":
                    out.update(max((total(n) for n in _branches(i)), key=weight, default={}))
                    out[CONDITIONALS] += 1
                else:
                    for n in _called(i):
                        out.update(total(n))
            totals[name] = out
            return out

        return total(self.entry)


# ---- collectives ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program."""

    name: str
    kind: str  # one of KINDS
    axis: str  # the mesh axes its groups span, e.g. "tensor", "data+tensor"
    shape: str  # the operand's (what each device contributes), layouts dropped: "bf16[8,4096]"
    bytes: float  # per device and execution (module docstring)
    wire_bytes: float  # what a device sends per execution by a ring algorithm (module docstring)
    group_size: int
    loops: tuple[Loop, ...]  # the while loops around it, outermost first
    executions: int  # per step: the product of the loops' trip counts


def _collective(instruction: Instruction, computation: Computation, axes: dict[str, int]) -> Collective:
    kind = _kind(instruction)
    operands = instruction.operands[:1] if kind == "collective-permute" else instruction.operands
    shapes = [computation.shapes[o] for o in operands]
    operand = sum(shape_bytes(s) for s in shapes)
    groups = _groups(instruction, math.prod(axes.values()))
    size = 2 if kind == "collective-permute" else len(groups[0])
    moves = any(len(set(g)) > 1 for g in groups)
    result = operand * size if kind == "all-gather" else operand
    wire = {
        "all-gather": (size - 1) * operand,
        "all-reduce": 2 * (size - 1) / size * operand,
        "reduce-scatter": (size - 1) / size * operand,
        "all-to-all": (size - 1) / size * operand,
        "collective-permute": operand if moves else 0.0,
    }[kind]
    shape = ", ".join(re.sub(r"\{[^}]*\}", "", s) for s in shapes)
    return Collective(instruction.name, kind, _axis(groups, axes), shape, result, wire, size, (), 1)


def collective_ops(hlo_text: str, mesh, trip_count_default: int | None = None) -> list[Collective]:
    """Every collective of a compiled program (`compiled.as_text()`), in program order, with the
    loops around it and how often it executes a step (every branch of a conditional listed).
    mesh: the Mesh (or {axis: size}) the program was compiled for."""
    program, axes, found = _Program(hlo_text, trip_count_default), mesh_axes(mesh), []

    def walk(name: str, loops: tuple[Loop, ...], executions: int):
        computation = program.computations[name]
        for i in computation.instructions:
            if _kind(i):
                record = _collective(i, computation, axes)
                found.append(dataclasses.replace(record, loops=loops, executions=executions))
            elif i.opcode == "while":
                loop = program.loop(i, computation)
                for key in ("condition", "body"):
                    for n in _computation_names(_attribute(i.attributes, key)):
                        walk(n, loops + (loop,), executions * loop.trip_count)
            else:
                for n in _branches(i) if i.opcode == "conditional" else _called(i):
                    walk(n, loops, executions)

    walk(program.entry, (), 1)
    return found


def collective_bytes(hlo_text: str, mesh, trip_count_default: int | None = None) -> dict:
    """What one device communicates in one execution of a compiled program (a training step):
    {"bytes" | "wire_bytes": {kind: {axis: bytes}}, "ops": {kind: {axis: executions}},
    "total_bytes", "total_wire_bytes", "conditionals": executions, "assumed_trip_counts": {while
    name: count}} (bytes and wire bytes as the module docstring defines them; loops times their
    trip counts; a conditional's branch with the most bytes)."""
    program, axes = _Program(hlo_text, trip_count_default), mesh_axes(mesh)

    def cost(instruction: Instruction, computation: Computation) -> dict:
        if not _kind(instruction):
            return {}
        op = _collective(instruction, computation, axes)
        return {
            ("bytes", op.kind, op.axis): op.bytes,
            ("wire_bytes", op.kind, op.axis): op.wire_bytes,
            ("ops", op.kind, op.axis): 1,
        }

    totals = program.executed(cost, weight=lambda c: sum(v for k, v in c.items() if k[0] == "bytes"))
    out = {"bytes": {}, "wire_bytes": {}, "ops": {}}
    conditionals = totals.pop(CONDITIONALS, 0)
    for (what, kind, axis), value in sorted(totals.items()):
        out[what].setdefault(kind, {})[axis] = value
    out["total_bytes"] = sum(v for k, v in totals.items() if k[0] == "bytes")
    out["total_wire_bytes"] = sum(v for k, v in totals.items() if k[0] == "wire_bytes")
    out["conditionals"] = conditionals
    out["assumed_trip_counts"] = dict(program.assumed)
    return out


# ---- FLOPs ---------------------------------------------------------------------------------------------
_KERNEL_TARGETS = ("tpu_custom_call", "mosaic_gpu", "__gpu$xla.gpu.triton", "__cudnn$")  # FLOPs unseen


def _dims(shape: str) -> tuple[int, ...]:
    return _arrays(shape)[0][1]


def _window(attributes: str, spatial: int) -> dict[str, list]:
    """A convolution's window attribute per spatial dimension: size, stride, pad (low, high),
    lhs_dilate, rhs_dilate (XLA's defaults where absent)."""
    text = _attribute(attributes, "window") or "{}"
    fields = dict(re.findall(r"(\w+)=([\w_]+)", text))
    split = lambda key, default: fields[key].split("x") if key in fields else [default] * spatial  # noqa: E731
    return {
        "stride": [int(v) for v in split("stride", "1")],
        "pad": [tuple(int(p) for p in v.split("_")) for v in split("pad", "0_0")],
        "lhs_dilate": [int(v) for v in split("lhs_dilate", "1")],
        "rhs_dilate": [int(v) for v in split("rhs_dilate", "1")],
    }


@functools.cache
def _taps(inputs: int, window: int, outputs: int, stride: int, pad_low: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dimension that read a real input
    element (not padding, not a hole of lhs dilation)."""
    at = np.arange(outputs)[:, None] * stride + np.arange(window)[None, :] * rhs_dilate - pad_low
    return int(np.sum((at >= 0) & (at <= (inputs - 1) * lhs_dilate) & (at % lhs_dilate == 0)))


def _convolution_flops(instruction: Instruction, computation: Computation) -> float:
    """2 x the multiply-adds a convolution does: per output feature and batch element, the input
    features of its group times the window taps that land on real input (XLA writes batched
    matmuls as convolutions with padded windows: those taps are mostly padding)."""
    lhs_shape, kernel_shape = (_dims(computation.shapes[o]) for o in instruction.operands[:2])
    out_shape = _dims(instruction.shape)
    lhs_labels, rest = _attribute(instruction.attributes, "dim_labels").split("_")
    kernel_labels, out_labels = rest.split("->")
    spatial = sorted(c for c in out_labels if c.isdigit())
    window = _window(instruction.attributes, len(spatial))
    taps = 1
    for d, label in enumerate(spatial):
        taps *= _taps(
            lhs_shape[lhs_labels.index(label)],
            kernel_shape[kernel_labels.index(label)],
            out_shape[out_labels.index(label)],
            window["stride"][d],
            window["pad"][d][0],
            window["lhs_dilate"][d],
            window["rhs_dilate"][d],
        )
    per_position = math.prod(out_shape) / math.prod(out_shape[out_labels.index(c)] for c in spatial)
    return 2.0 * per_position * kernel_shape[kernel_labels.index("i")] * taps


def _flops(instruction: Instruction, computation: Computation) -> dict:
    """2 x multiply-adds of a dot or a convolution; a kernel's own cost estimate, if it has one."""
    if instruction.opcode == "dot":
        lhs = _dims(computation.shapes[instruction.operands[0]])
        contracted = [
            int(d) for d in re.findall(r"\d+", _attribute(instruction.attributes, "lhs_contracting_dims") or "")
        ]
        return {"flops": 2.0 * math.prod(_dims(instruction.shape)) * math.prod(lhs[d] for d in contracted)}
    if instruction.opcode == "convolution":
        return {"flops": _convolution_flops(instruction, computation)}
    if instruction.opcode == "custom-call":
        target = _attribute(instruction.attributes, "custom_call_target") or ""
        # the kernel's cost estimate (Mosaic writes the number quoted: "flops":"515...")
        estimate = re.search(r'cost_estimate\\?"\s*:\s*\{[^}]*?flops\\?"\s*:\s*\\?"?(\d+)', instruction.attributes)
        if estimate:
            return {"flops": float(estimate.group(1))}
        if target.strip('"').startswith(_KERNEL_TARGETS):
            return {("uncosted", target.strip('"')): 1}
    return {}


def executed_costs(hlo_text: str, trip_count_default: int | None = None) -> dict:
    """One device's executed dot/convolution FLOPs in one execution of a compiled program, loops
    times their trip counts (XLA's cost_analysis counts a loop body once), of a conditional's
    branches the one with the most FLOPs: {"flops", "uncosted_kernels": {custom-call target:
    executions} (kernels, e.g. Pallas, without a cost estimate: their FLOPs are not in "flops"),
    "conditionals": executions, "assumed_trip_counts"}."""
    program = _Program(hlo_text, trip_count_default)
    totals = program.executed(_flops, weight=lambda c: c["flops"])
    return {
        "flops": float(totals["flops"]),
        "uncosted_kernels": {k[1]: v for k, v in totals.items() if isinstance(k, tuple)},
        "conditionals": totals[CONDITIONALS],
        "assumed_trip_counts": dict(program.assumed),
    }


def executed_flops(hlo_text: str, trip_count_default: int | None = None) -> float:
    """`executed_costs(...)["flops"]`: one device's executed matmul FLOPs a step."""
    return executed_costs(hlo_text, trip_count_default)["flops"]
