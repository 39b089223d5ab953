"""peft's LoRA adapter folders, read onto our models and written from them, in the released layouts.

    adapter = read_adapter(path, base_config, base_params)       # a peft folder or ours -> adapters.Adapter
    summary = write_peft_folder(out, config, params, layout)    # a LoRA-adapted model -> a folder peft loads

A peft folder is `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`)
whose tensors are named `base_model.model.` + a released module path + `.lora_A.weight` [r, in],
`.lora_B.weight` [out, r] and, with DoRA, `.lora_magnitude_vector` [out] (m). The layouts
(`released.detect`) and their adaptable linears:

- `chatglm` (ChatGLM-6B; GLM-130B's names): `transformer.layers.{i}.attention.query_key_value` (fused,
  rows [H, 3, D]), `attention.dense`, `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h`;
- `chatglm2` (ChatGLM2/3, GLM-4-9b-chat): `transformer.encoder.layers.{i}.self_attention.query_key_value`
  (rows [all q | k groups | v groups]), `self_attention.dense`, `mlp.dense_h_to_4h` (gated halves),
  `mlp.dense_4h_to_h`;
- `hf-glm` (transformers' GlmForCausalLM): `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
  `mlp.gate_up_proj`, `mlp.down_proj`.

B's rows and DoRA's magnitudes permute as the adapted weight's rows do, so `convert.py`'s rules
convert them (B [out, r] read as a weight with r inputs); A's columns reshape to the weight's
input axes. A LoRA on a fused `query_key_value` is our `lora_targets=query_key_value` (one A
shared by query, key and value); written back, our independent query/key/value LoRA becomes the
fused module's rank-3r LoRA: A = [A_q; A_k; A_v], B block-diagonal, its alpha in `alpha_pattern`
so that alpha / r (rsLoRA: alpha / sqrt(r)) is kept. Ranks and alphas that differ between modules
(`rank_pattern`, `alpha_pattern`, or rank 3r read back) are held at the largest rank, each
module's A and B zero-padded and B scaled by its own scaling over the common one: the same update.
DoRA's m becomes our `lora_magnitude_delta` = m - ||W|| (the base's kernel norm per output
feature, fp32), so reading needs the base.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from glm_jax import convert
from glm_jax.adapters import PEFT_CONFIG_FILE, Adapter, load_adapter
from glm_jax.checkpoints import CheckpointError
from glm_jax.config import LORA_TARGETS, QKV, ConfigError, GLMConfig, lora_scaling
from glm_jax.export import ExportError, numpy_dtype
from glm_jax.peft import PeftConfig, lora_a_path
from glm_jax.quant import dequantize_params
from glm_jax.released import ShardedTensors, read_tensor_file

CONFIG_FILE = PEFT_CONFIG_FILE
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = "lora_A.weight", "lora_B.weight"
MAGNITUDE_SUFFIXES = ("lora_magnitude_vector", "lora_magnitude_vector.weight")


class PeftFolderError(CheckpointError):
    """A peft folder that is malformed, unsupported, or does not fit the base; the message names
    the field or tensor to fix."""


@dataclasses.dataclass(frozen=True)
class Module:
    """One adaptable linear of a released layout's block."""

    name: str  # its path inside a layer, e.g. "self_attention.query_key_value"
    targets: tuple[str, ...]  # our Linear(s) it holds: query, key and value for a fused QKV

    @property
    def short(self) -> str:
        """peft's target_modules name for it."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def fused(self) -> bool:
        return len(self.targets) > 1


LAYER_PREFIX = {
    "chatglm": "transformer.layers.{i}.",
    "chatglm2": "transformer.encoder.layers.{i}.",
    "hf-glm": "model.layers.{i}.",
}
_MLP = (("dense_h_to_4h", ("dense_h_to_4h",)), ("dense_4h_to_h", ("dense_4h_to_h",)))
MODULES = {
    "chatglm": tuple(
        Module(n, t)
        for n, t in (("attention.query_key_value", QKV), ("attention.dense", ("dense",)))
        + tuple((f"mlp.{n}", t) for n, t in _MLP)
    ),
    "chatglm2": tuple(
        Module(n, t)
        for n, t in (("self_attention.query_key_value", QKV), ("self_attention.dense", ("dense",)))
        + tuple((f"mlp.{n}", t) for n, t in _MLP)
    ),
    "hf-glm": tuple(
        Module(n, t)
        for n, t in (
            ("self_attn.q_proj", ("query",)),
            ("self_attn.k_proj", ("key",)),
            ("self_attn.v_proj", ("value",)),
            ("self_attn.o_proj", ("dense",)),
            ("mlp.gate_up_proj", ("dense_h_to_4h",)),
            ("mlp.down_proj", ("dense_4h_to_h",)),
        )
    ),
}
LAYOUTS = tuple(MODULES)
RULES = {"chatglm": convert.glm130b_rules, "chatglm2": convert.chatglm2_rules, "hf-glm": convert.hf_glm_rules}
# the layout a family's adapters are written in when --layout does not say (GLM-130B and ours: ChatGLM-6B's names)
FAMILY_LAYOUT = {
    "glm": "chatglm",
    "glm-130b": "chatglm",
    "chatglm-6b": "chatglm",
    "chatglm2-6b": "chatglm2",
    "chatglm3-6b": "chatglm2",
    "glm-4": "hf-glm",
}

# adapter_config.json fields that change what the adapter computes and are supported only when off
OFF_ONLY = (
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "lora_bias",
    "use_qalora",
    "megatron_config",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "use_bdlora",
)
# fields that only say how peft trained or initialised the adapter, or where it came from
INFORMATIONAL = (
    "task_type",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "lora_dropout",
    "runtime_config",
    "ensure_weight_tying",
    "qalora_group_size",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "astra_config",
    "lora_ga_config",
)
READ = (
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "bias",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
)
# init_lora_weights values that only initialise A and B; the others (pissa, olora, corda, loftq, ...)
# rewrite the base weights as peft loads the adapter, or swap in another layer
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def is_peft_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_adapter(path: str, base_config: GLMConfig, base_params: dict) -> Adapter:
    """Any adapter folder onto its base: a peft LoRA folder (`read_peft_folder`) or ours
    (`adapters.load_adapter`; its base is checked by the caller against its recorded identity)."""
    if is_peft_folder(path):
        return read_peft_folder(path, base_config, base_params)
    return load_adapter(path)


# ---- the layouts' conversions -----------------------------------------------------------------
def _group(target: str) -> str:
    return "attention" if target in QKV + ("dense",) else "mlp"


def _path(target: str, leaf: str) -> tuple[str, ...]:
    return ("layers", _group(target), target, leaf)


FUSED_A = ("layers", "attention", "query_key_value", "lora_a")


def in_shape(target: str, c: GLMConfig) -> tuple[int, ...]:
    """Our kernel's input axes for `target` (its A is `in_shape + (r,)`)."""
    if target == "dense":
        return (c.num_attention_heads, c.head_dim)
    return (c.inner_hidden_size,) if target == "dense_4h_to_h" else (c.hidden_size,)


@dataclasses.dataclass(frozen=True)
class Conversion:
    """One released module's LoRA tensors <-> ours, for one config."""

    layout: str
    module: Module
    out_rows: int  # the torch weight is [out_rows, in_cols]
    in_cols: int
    rows: Callable[[np.ndarray], dict[str, np.ndarray]]  # [out_rows, k] -> {target: [k, *features]}

    def key(self, layer: int) -> str:
        """The module's path in the released model (what target_modules matches)."""
        return LAYER_PREFIX[self.layout].format(i=layer) + self.module.name

    def row_index(self) -> dict[str, np.ndarray]:
        """{target: [*features] the torch row of each of our output features}: the rule run on row numbers."""
        return {t: x[0] for t, x in self.rows(np.arange(self.out_rows)[:, None]).items()}

    def rows_back(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray:
        """{target: [k, *features]} -> torch [out_rows, k]; a target not in `parts` gets zero rows."""
        out = np.zeros((self.out_rows, k), np.float32)
        for t, index in self.row_index().items():
            if t in parts:
                out[index.reshape(-1)] = np.asarray(parts[t], np.float32).reshape(k, -1).T
        return out


def conversions(layout: str, c: GLMConfig, error: type[Exception] = PeftFolderError) -> dict[str, Conversion]:
    """{module name: Conversion} of `layout` for config c, built from the layout's weight rules; a
    config whose block the layout cannot hold raises `error` with the rule's reason."""
    try:
        layer_rules = {r.source: r for r in RULES[layout](c)[0]}
    except convert.ConversionError as e:
        raise error(f"this model does not have the {layout} layout's block: {e}") from None
    out = {}
    for m in MODULES[layout]:
        rule = layer_rules[LAYER_PREFIX[layout] + m.name + ".weight"]
        # the attention output's rule reshapes its input to (H, D); its rows are the hidden size as they are
        row_rule = (
            convert._linear(_path("dense", "kernel")[1:], (c.hidden_size,)) if m.targets == ("dense",) else rule.convert
        )

        def rows(w, row_rule=row_rule):
            return {path[-2]: x for path, x in row_rule(w).items() if path[-1] == "kernel"}

        out[m.name] = Conversion(layout, m, rule.shape[0], rule.shape[1], rows)
    return out


def kernel_norms(params: dict, config: GLMConfig, targets) -> dict[str, np.ndarray]:
    """{target: [L, *features]} ||W|| of the base kernel over its input axes (fp32; a quantized
    base dequantized): what DoRA's magnitude starts from."""
    if config.quantization != "none":
        params = dequantize_params(params, config)
    norms = {}
    for t in targets:
        w = np.asarray(params["layers"][_group(t)][t]["kernel"], np.float32)
        norms[t] = np.sqrt(np.sum(np.square(w), axis=tuple(range(1, 1 + len(in_shape(t, config))))))  # on the host
    return norms


# ---- adapter_config.json ----------------------------------------------------------------------
def _read_json(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PeftFolderError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise PeftFolderError(f"{path} is not a JSON object")
    return cfg


def check_fields(cfg: dict, where: str) -> None:
    """PeftFolderError naming the first field that changes what the adapter computes and is not
    supported. Fields about training, initialisation or provenance pass; unknown fields that are
    set are ignored with a warning."""
    if cfg.get("peft_type") != "LORA":
        raise PeftFolderError(f"{where}: peft_type={cfg.get('peft_type')!r}; only LoRA adapters (LORA) are read")
    if cfg.get("bias", "none") != "none":
        raise PeftFolderError(f"{where}: bias={cfg['bias']!r} also trains the base's biases; only bias='none' is read")
    if cfg.get("modules_to_save"):
        raise PeftFolderError(
            f"{where}: modules_to_save={cfg['modules_to_save']!r} (whole trained modules beside the LoRA) is not "
            "supported: only LoRA pairs on the layers' linears"
        )
    init = cfg.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise PeftFolderError(
            f"{where}: init_lora_weights={init!r} changes the base weights as peft loads the adapter; save it with "
            "peft's path_initial_model_for_weight_conversion (a plain LoRA) and read that"
        )
    for name in OFF_ONLY:
        if cfg.get(name):
            raise PeftFolderError(f"{where}: {name}={cfg[name]!r} is not supported (only its default, off)")
    for name in ("r", "lora_alpha"):
        if isinstance(cfg.get(name), bool) or not isinstance(cfg.get(name), int | float) or cfg[name] <= 0:
            raise PeftFolderError(f"{where}: {name}={cfg.get(name)!r} must be a positive number")
    if cfg.get("fan_in_fan_out"):
        warnings.warn(
            f"{where}: fan_in_fan_out=true is for Conv1D weights stored [in, out]; the released layouts' modules "
            "are nn.Linear, for which peft resets it to false, and so it is read",
            stacklevel=3,
        )
    unknown = sorted(k for k, v in cfg.items() if k not in READ + INFORMATIONAL + OFF_ONLY and v)
    if unknown:
        warnings.warn(f"{where}: fields this reader does not know, ignored: {unknown}", stacklevel=3)


def targeted(cfg: dict, key: str) -> bool:
    """Whether peft wraps the module at `key` (its path in the base model), as peft's
    check_target_module_exists: target_modules (a list: the path or its last parts; a string: a
    regex over the path), exclude_modules, layers_to_transform with layers_pattern."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{x}") for x in exclude):
            return False
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear":  # all-linear: every linear but the output head
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not (key in targets or any(key.endswith(f".{t}") for t in targets)):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = cfg.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: dict | None, key: str, default):
    """rank_pattern / alpha_pattern's value for the module at `key`, as peft's get_pattern_key."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


# ---- reading ------------------------------------------------------------------------------------
def _read_tensors(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """(name -> fp32 array, the weight file) of a peft folder."""
    file = next((f for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if file is None:
        raise PeftFolderError(f"{folder} has {CONFIG_FILE} but neither of {WEIGHT_FILES}")
    try:
        names = list(read_tensor_file(folder, file).keys())
        tensors = ShardedTensors({n: file for n in names}, folder)
        return {n: np.asarray(convert._to_numpy(tensors[n]), np.float32) for n in names}, file
    except convert.ConversionError as e:
        raise PeftFolderError(str(e)) from None


def _name_pattern(layout: str) -> re.Pattern:
    """A LoRA tensor name of `layout`: groups (layer, module name, suffix)."""
    before, after = LAYER_PREFIX[layout].split("{i}")
    modules = "|".join(re.escape(m.name) for m in MODULES[layout])
    suffixes = "|".join(re.escape(s) for s in (A_SUFFIX, B_SUFFIX) + MAGNITUDE_SUFFIXES)
    return re.compile(rf"{re.escape(PREFIX + before)}(\d+){re.escape(after)}({modules})\.({suffixes})")


def detect_layout(names, where: str) -> str:
    """The released layout the tensor names belong to (the layouts' module paths differ): the one
    most of them match; a name that fits none is an error naming it."""
    names = sorted(names)
    if not names:
        raise PeftFolderError(f"{where} holds no tensors")
    matched = {layout: [n for n in names if _name_pattern(layout).fullmatch(n)] for layout in LAYOUTS}
    layout = max(LAYOUTS, key=lambda x: len(matched[x]))
    stray = [n for n in names if n not in set(matched[layout])]
    if not matched[layout]:
        raise PeftFolderError(
            f"{where}: {names[0]} is not a LoRA tensor (lora_A / lora_B / lora_magnitude_vector) of a layer linear "
            f"of the chatglm, chatglm2 or hf-glm layouts ({', '.join(PREFIX + p for p in LAYER_PREFIX.values())})"
        )
    if stray:
        raise PeftFolderError(
            f"{where}: {stray[0]} is not a LoRA tensor of the {layout} layout's attention and MLP linears, which "
            f"the other tensors are ({len(stray)} such tensor(s)); LoRA on embeddings or the output layer is not "
            "supported"
        )
    return layout


def _group_tensors(tensors: dict, layout: str, config: GLMConfig, where: str) -> dict[tuple[int, str], dict]:
    """{(layer, module name): {"A" | "B" | "m": (tensor name, array)}}, every layer in range."""
    pattern = _name_pattern(layout)
    grouped: dict[tuple[int, str], dict] = {}
    for name, x in tensors.items():
        layer, module, suffix = pattern.fullmatch(name).groups()
        if int(layer) >= config.num_layers:
            raise PeftFolderError(f"{where}: {name} is for layer {layer}; this base has {config.num_layers} layers")
        kind = {A_SUFFIX: "A", B_SUFFIX: "B"}.get(suffix, "m")
        grouped.setdefault((int(layer), module), {})[kind] = (name, x)
    return grouped


def _checked_rank(found: dict, conv: Conversion, layer: int, where: str, dora: bool) -> int:
    """The pair's rank, once both halves are there with shapes this base takes (else the tensor named)."""
    key = PREFIX + conv.key(layer)
    for kind, suffix in (("A", A_SUFFIX), ("B", B_SUFFIX)):
        if kind not in found:
            raise PeftFolderError(f"{where}: {key}.{suffix} is missing (the folder holds the pair's other half)")
    (a_name, a), (b_name, b) = found["A"], found["B"]
    r = a.shape[0] if a.ndim == 2 else 0
    problems = []
    if r < 1 or a.shape != (r, conv.in_cols):
        problems.append(f"{a_name} has shape {a.shape}; this base needs (r, {conv.in_cols})")
    elif b.shape != (conv.out_rows, r):
        problems.append(f"{b_name} has shape {b.shape}; this base needs ({conv.out_rows}, {r}) (out, r)")
    if "m" in found:
        m_name, m = found["m"]
        if not dora:
            problems.append(f"{m_name} is a DoRA magnitude, but use_dora is false")
        elif m.shape != (conv.out_rows,):
            problems.append(f"{m_name} has shape {m.shape}; this base needs ({conv.out_rows},)")
    if problems:
        raise PeftFolderError(f"{where}: the adapter does not fit this base: " + "; ".join(problems))
    return r


def read_peft_folder(path: str, config: GLMConfig, params: dict) -> Adapter:
    """A peft LoRA folder onto the base (config, params, float or quantized) -> our Adapter: its
    PeftConfig (rank, alpha, targets, rsLoRA, DoRA from the file) and parameters in our stacked
    layout, DoRA magnitudes as deltas from this base's kernel norms. Layers or targets the file
    leaves out (layers_to_transform) get zeros: no update, as peft's init. PeftFolderError names
    the field or tensor that is unsupported or does not fit."""
    folder = os.path.abspath(path)
    cfg = _read_json(folder)
    check_fields(cfg, os.path.join(folder, CONFIG_FILE))
    tensors, file = _read_tensors(folder)
    where = os.path.join(folder, file)
    layout = detect_layout(tensors, where)
    convs = conversions(layout, config)
    dora = bool(cfg.get("use_dora"))
    pairs = {}
    for (layer, module), found in sorted(_group_tensors(tensors, layout, config, where).items()):
        conv = convs[module]
        key = conv.key(layer)
        if not targeted(cfg, key):
            raise PeftFolderError(
                f"{where} holds a LoRA for {key}, which target_modules={cfg.get('target_modules')!r} (with "
                "exclude_modules / layers_to_transform) does not select: peft would not load it"
            )
        r = _checked_rank(found, conv, layer, where, dora)
        want = pattern_value(cfg.get("rank_pattern"), key, cfg["r"])
        if r != want:
            raise PeftFolderError(f"{where}: {found['A'][0]} has rank {r}, but r / rank_pattern give {key} rank {want}")
        alpha = pattern_value(cfg.get("alpha_pattern"), key, cfg["lora_alpha"])
        pairs[(layer, module)] = (found["A"][1], found["B"][1], found.get("m", (None, None))[1], r, alpha)
    if not pairs:
        raise PeftFolderError(f"{where} holds no LoRA pair")
    peft = _peft_config(cfg, convs, pairs, where)
    params = _our_params(pairs, convs, peft, config, params)
    base = {"base_model_name_or_path": cfg.get("base_model_name_or_path")}
    return Adapter(peft.model_config(config), peft, params, 0, base, folder, layout)


def _peft_config(cfg: dict, convs: dict, pairs: dict, where: str) -> PeftConfig:
    """Our PeftConfig for the pairs: the targets they cover; one rank and alpha (the largest rank
    and its alpha where the modules differ: `_our_params` folds each module's own scaling into B)."""
    modules = [convs[m].module for _, m in pairs]
    fused = any(m.fused for m in modules)
    covered = {t for m in modules for t in m.targets}
    names = (["query_key_value"] if fused else []) + [
        t for t in LORA_TARGETS if t in covered and not (fused and t in QKV)
    ]
    rank, alpha = max((r, alpha) for _, _, _, r, alpha in pairs.values())
    init = cfg.get("init_lora_weights", True)
    try:
        return PeftConfig(
            method="lora",
            lora_rank=int(rank),
            lora_alpha=float(alpha),
            lora_dropout=float(cfg.get("lora_dropout") or 0.0),
            lora_targets=",".join(names),
            lora_init="gaussian" if init == "gaussian" else "kaiming",
            lora_rslora=bool(cfg.get("use_rslora")),
            lora_dora=bool(cfg.get("use_dora")),
        )
    except ConfigError as e:
        raise PeftFolderError(f"{where}: {e}") from None


def _our_params(pairs: dict, convs: dict, peft: PeftConfig, config: GLMConfig, base: dict) -> dict:
    """The pairs in our stacked layout (fp32): A zero-padded to the common rank, B too and scaled
    by the module's scaling over the common one, DoRA's m as m - ||W||."""
    n, rank, c = config.num_layers, peft.lora_rank, peft.model_config(config)
    s = lora_scaling(peft.lora_alpha, rank, peft.lora_rslora)
    features = {t: x.shape for conv in convs.values() for t, x in conv.row_index().items()}
    flat = {}
    for t in c.lora_target_names:
        flat[_path(t, "lora_b")] = np.zeros((n, rank) + features[t], np.float32)
        if not (c.lora_fused_qkv and t in QKV):
            flat[_path(t, "lora_a")] = np.zeros((n,) + in_shape(t, c) + (rank,), np.float32)
        if peft.lora_dora:
            flat[_path(t, "lora_magnitude_delta")] = np.zeros((n,) + features[t], np.float32)
    if c.lora_fused_qkv:
        flat[FUSED_A] = np.zeros((n, c.hidden_size, rank), np.float32)
    norms = kernel_norms(base, config, c.lora_target_names) if peft.lora_dora else {}
    for (layer, module), (a, b, m, r, alpha) in pairs.items():
        conv = convs[module]
        first = conv.module.targets[0]
        a_full, b_full = np.zeros((rank, a.shape[1]), np.float32), np.zeros((b.shape[0], rank), np.float32)
        a_full[:r], b_full[:, :r] = a, b * (lora_scaling(alpha, r, peft.lora_rslora) / s)
        flat[FUSED_A if conv.module.fused else _path(first, "lora_a")][layer] = a_full.T.reshape(
            in_shape(first, c) + (rank,)
        )
        for t, x in conv.rows(b_full).items():
            flat[_path(t, "lora_b")][layer] = x
        if m is not None:  # without one, m = ||W||: peft's init, a zero delta
            for t, x in conv.rows(m[:, None]).items():
                flat[_path(t, "lora_magnitude_delta")][layer] = x[0] - norms[t][layer]
    return traverse_util.unflatten_dict({p: jnp.asarray(x) for p, x in flat.items()})


# ---- writing ------------------------------------------------------------------------------------
NOT_LORA = {
    "pre_seq_len": "a P-tuning v2 prefix",
    "num_virtual_tokens": "virtual prompt tokens",
    "adapter_size": "bottleneck adapters",
    "ia3": "IA3 scales",
}


def default_layout(family: str) -> str:
    return FAMILY_LAYOUT.get(family, "chatglm")


def peft_tensors(config: GLMConfig, params: dict, layout: str) -> tuple[dict[str, np.ndarray], dict]:
    """A LoRA-adapted model (config with lora_rank, params with its lora leaves beside the base)
    -> (peft's tensor name -> fp32 array, adapter_config.json dict) in `layout`'s names."""
    on = [what for field, what in NOT_LORA.items() if getattr(config, field)]
    if on or not config.lora_rank:
        raise ExportError(
            f"--format peft writes LoRA adapters; this model has {on[0] if on else 'no LoRA'}: pass --adapter DIR "
            "of a finetune.py --method lora run"
        )
    if layout not in LAYOUTS:
        raise ExportError(f"layout {layout!r}; choose one of {LAYOUTS}")
    convs = conversions(layout, config, ExportError)
    flat = traverse_util.flatten_dict(params)
    flat = {p: np.asarray(x, np.float32) for p, x in flat.items() if p[-1].startswith("lora_")}
    r, targets = config.lora_rank, config.lora_target_names
    tensors, ranks = {}, {}
    adapted = [m for m in MODULES[layout] if set(m.targets) & set(targets)]
    norms = kernel_norms(params, config, {t for m in adapted for t in m.targets}) if config.lora_dora else {}
    for module in adapted:
        conv = convs[module.name]
        present = [t for t in module.targets if t in targets]
        shared = not module.fused or config.lora_fused_qkv  # one A: rank r; else A_q, A_k, A_v stacked
        k = r if shared else r * len(present)
        ranks[module.short] = k
        for layer in range(config.num_layers):
            key = PREFIX + conv.key(layer)
            a_of = {t: flat[lora_a_path(flat, _path(t, "lora_a")[:-1])][layer].reshape(-1, r).T for t in present}
            parts = {}
            for j, t in enumerate(present):
                b = flat[_path(t, "lora_b")][layer]
                if shared:
                    parts[t] = b
                else:  # block-diagonal: target j's rows of B see only its own r columns of A
                    parts[t] = np.zeros((k,) + b.shape[1:], np.float32)
                    parts[t][j * r : (j + 1) * r] = b
            tensors[f"{key}.{A_SUFFIX}"] = a_of[present[0]] if shared else np.concatenate([a_of[t] for t in present])
            tensors[f"{key}.{B_SUFFIX}"] = conv.rows_back(parts, k)
            if config.lora_dora:  # peft's m; a target without LoRA in a fused module keeps ||W||
                m = {t: norms[t][layer][None] for t in module.targets}
                for t in present:
                    m[t] = m[t] + flat[_path(t, "lora_magnitude_delta")][layer]
                tensors[f"{key}.lora_magnitude_vector"] = conv.rows_back(m, 1)[:, 0]
    return tensors, _config_json(config, ranks)


def _config_json(config: GLMConfig, ranks: dict[str, int]) -> dict:
    r, alpha = config.lora_rank, config.lora_alpha
    grow = (lambda k: alpha * math.sqrt(k / r)) if config.lora_rslora else (lambda k: alpha * k / r)
    rank_pattern = {name: k for name, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": config.lora_rslora,
        "use_dora": config.lora_dora,
        "modules_to_save": None,
        "init_lora_weights": "gaussian" if config.lora_init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {name: _number(grow(k)) for name, k in rank_pattern.items()},  # alpha / r kept
    }


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def write_peft_folder(
    out: str,
    config: GLMConfig,
    params: dict,
    layout: str,
    base_model_name_or_path: str | None = None,
    dtype: str = "float32",
) -> dict:
    """`peft_tensors` written as a peft folder (adapter_config.json, adapter_model.safetensors),
    beside `out` and renamed into place. -> a summary (layout, target_modules, r, tensors, bytes)."""
    from safetensors.numpy import save_file

    tensors, cfg = peft_tensors(config, params, layout)
    cfg["base_model_name_or_path"] = base_model_name_or_path
    np_dtype = numpy_dtype(dtype)
    tensors = {n: np.ascontiguousarray(x, np_dtype) for n, x in tensors.items()}
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out} exists and is not empty; choose another output folder")
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHT_FILES[0]), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "layout": layout,
        "target_modules": cfg["target_modules"],
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "rank_pattern": cfg["rank_pattern"],
        "use_rslora": cfg["use_rslora"],
        "use_dora": cfg["use_dora"],
        "tensors": len(tensors),
        "bytes": int(sum(x.nbytes for x in tensors.values())),
    }
