"""Released checkpoint folders in, serving checkpoints out: shards, layouts, families.

    tensors = ShardedTensors.open("/data/chatglm2-6b")     # lazy: name -> array, read on access
    result = convert_folder("/data/chatglm2-6b")            # config, params, family, tokenizer file

Layouts (detected from `config.json` and file names, docs/reference.md sections 2-3):

- `chatglm`: ChatGLM-6B's Hugging Face folder (`model_type` chatglm with `position_encoding_2d`);
- `chatglm2`: ChatGLM2-6B / ChatGLM3-6B (`multi_query_group_num`; chatglm3 when `_name_or_path`
  names it);
- `hf-glm`: transformers' `GlmForCausalLM` (`model_type` glm), family glm-4;
- `glm130b-sat`: GLM-130B's SwissArmyTransformer rank folder (`latest`, `mp_rank_XX_model_states.pt`);
- the other families' layouts (`layouts.py`): `llama`, `bloom`, `opt` (transformers'
  *ForCausalLM, with or without the `model.` / `transformer.` prefix) and `thudm-glm` (the
  original GLM, THUDM/GLM's `modeling_glm.py`), each recognised by its own module.

Weights come as `pytorch_model-0000k-of-0000n.bin` or `*.safetensors` shards with their
`*.index.json` (any shard may hold any tensor: the index decides), or one unsharded file. Tensors
are read one at a time (safetensors lazily; `.bin` files memory-mapped through torch), so the
converter holds one copy of the model plus one tensor.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from glm_jax import convert, layouts
from glm_jax.config import ConfigError, GLMConfig, get_config
from glm_jax.convert import ConversionError
from glm_jax.families import get_family
from glm_jax.layout import Renamed

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("ice_text.model", "tokenizer.model", "tokenizer.json")
DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.float32": "float32",
}


def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "reading .bin / .pt checkpoint files needs torch (pip install torch); "
            "safetensors shards need only the safetensors package"
        ) from None
    return torch


def read_tensor_file(folder: str, file: str):
    """A weight file as a name -> lazy tensor mapping (safetensors: a safe_open handle; .bin:
    torch's memory-mapped state dict)."""
    path = os.path.join(folder, file)
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            return safe_open(path, framework="np")
        torch = _torch()
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # an old (non-zip) file cannot be memory-mapped: read it whole
            return torch.load(path, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as e:  # a truncated or foreign file: say which
        raise ConversionError(f"cannot read {path}: {type(e).__name__}: {e}") from None


class ShardedTensors(Mapping):
    """name -> numpy array (its stored dtype; bf16 via ml_dtypes) over a folder's weight files,
    read on access with one file open at a time. `shape_of(name)` / `dtype_of(name)` need no
    data (the headers are read up front); `where(name)` names the file (for error messages);
    `read_order()` lists the names file by file, so a converter walks the shards in turn."""

    def __init__(self, weight_map: dict[str, str], folder: str):
        self.folder, self.weight_map = folder, dict(weight_map)
        self._open_file, self._handle = None, None
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
        if missing:
            raise ConversionError(
                f"{folder}: the index names {len(missing)} missing shard file(s): " + ", ".join(missing)
            )
        self._shapes, self._dtypes = {}, {}
        for file in sorted(set(self.weight_map.values())):
            handle = self._read(file)
            held = set(handle.keys())
            for name in [n for n, f in self.weight_map.items() if f == file]:
                if name not in held:
                    raise ConversionError(
                        f"{os.path.join(folder, file)} does not hold {name}, which the index puts there"
                    )
                self._shapes[name], self._dtypes[name] = self._header(file, handle, name)

    @classmethod
    def open(cls, folder: str) -> ShardedTensors:
        folder = os.path.abspath(folder)
        for index in INDEX_FILES:
            path = os.path.join(folder, index)
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConversionError(f"{path} is not a weight index ({e})") from None
                return cls(weight_map, folder)
        files = [f for f in SINGLE_FILES if os.path.isfile(os.path.join(folder, f))]
        files = (
            files
            or sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
            or sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        )
        if not files:
            raise ConversionError(
                f"{folder} holds no weights: expected {' or '.join(INDEX_FILES)} with its "
                "shards, or model.safetensors / pytorch_model.bin"
            )
        return cls({name: file for file in files for name in read_tensor_file(folder, file).keys()}, folder)

    def _read(self, file: str):
        return read_tensor_file(self.folder, file)

    @staticmethod
    def _header(file, handle, name) -> tuple[tuple[int, ...], str]:
        if file.endswith(".safetensors"):
            sl = handle.get_slice(name)
            return tuple(sl.get_shape()), DTYPES.get(sl.get_dtype(), sl.get_dtype())
        x = handle[name]
        return tuple(x.shape), DTYPES.get(str(x.dtype), str(x.dtype))

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype_of(self, name: str) -> str:
        return self._dtypes[name]

    def where(self, name: str) -> str:
        return f" (in {self.weight_map[name]})" if name in self.weight_map else ""

    def read_order(self) -> list[str]:
        return sorted(self.weight_map, key=lambda n: self.weight_map[n])

    def __getitem__(self, name: str) -> np.ndarray:
        file = self.weight_map[name]
        if file != self._open_file:  # drop the previous file's mapping before opening the next
            self._open_file, self._handle = None, None
            self._handle, self._open_file = self._read(file), file
        if file.endswith(".safetensors"):
            return self._handle.get_tensor(name)
        x = self._handle[name]
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes

            return x.view(_torch().int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()

    def __contains__(self, name) -> bool:
        return name in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


# ---- layout and family ---------------------------------------------------------------------------
def read_config_json(folder: str) -> dict | None:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None


def is_sat_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "latest")) or bool(glob.glob(os.path.join(folder, "mp_rank_*.pt")))


def detect(folder: str) -> tuple[str, str, dict | None]:
    """(layout, family, config.json) of a released folder."""
    cfg = read_config_json(folder)
    if cfg is None:
        if is_sat_folder(folder):
            return "glm130b-sat", "glm-130b", None
        raise ConversionError(
            f"{folder} has no config.json and is not a GLM-130B rank folder (with `latest` or "
            "mp_rank_XX_model_states.pt)"
        )
    other = layouts.detect(cfg)
    if other is not None:
        return other.name, other.family_of(cfg) if other.family_of else other.families[0], cfg
    model_type = cfg.get("model_type")
    if model_type == "chatglm":
        if "position_encoding_2d" in cfg:
            return "chatglm", "chatglm-6b", cfg
        if "multi_query_group_num" in cfg:
            name = str(cfg.get("_name_or_path", "")).lower()
            return "chatglm2", "chatglm3-6b" if "chatglm3" in name else "chatglm2-6b", cfg
        raise ConversionError(
            f"{folder}/config.json: a chatglm config with neither position_encoding_2d "
            "(ChatGLM-6B) nor multi_query_group_num (ChatGLM2/3)"
        )
    if model_type == "glm":
        return "hf-glm", "glm-4", cfg
    raise ConversionError(
        f"{folder}/config.json: unknown model_type {model_type!r}; supported: chatglm "
        "(ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B), glm (transformers GlmForCausalLM, THUDM/GLM's GLMModel), "
        "llama, bloom and opt"
    )


LAYOUT_FAMILIES = {
    "chatglm": ("chatglm-6b", "glm"),
    "chatglm2": ("chatglm2-6b", "chatglm3-6b"),
    "hf-glm": ("glm-4", "chatglm2-6b", "chatglm3-6b"),
    "glm130b-sat": ("glm-130b", "glm"),
}


@dataclasses.dataclass
class Converted:
    config: GLMConfig
    params: dict
    family: str
    tokenizer_file: str | None
    layout: str
    step: int = 0
    source_dtype: str = "float32"
    ranks: int = 0


def layout_families(layout: str) -> tuple[str, ...]:
    """The families a folder of `layout` may be read as."""
    return layouts.LAYOUTS[layout].families if layout in layouts.LAYOUTS else LAYOUT_FAMILIES[layout]


def _config_for(layout: str, cfg: dict | None, overrides: dict) -> GLMConfig:
    try:
        if layout in layouts.LAYOUTS:
            return layouts.LAYOUTS[layout].config_from(cfg, **overrides)
        if layout == "chatglm":
            return convert.config_from_chatglm(cfg, **overrides)
        if layout == "chatglm2":
            return convert.config_from_chatglm2(cfg, **overrides)
        if layout == "hf-glm":
            return convert.config_from_hf_glm(cfg, **overrides)
        return get_config("glm-130b", **overrides)
    except KeyError as e:
        raise ConversionError(f"config.json lacks the field {e.args[0]!r}") from None


def _dtype_fields(stored: str) -> dict[str, str]:
    """Config fields for weights stored in `stored`, which is also the compute dtype: the model
    then computes what the released code computes in that dtype (`model.half()`, `.float()`);
    `--set dtype=...` / `param_dtype=...` set them apart."""
    return {"param_dtype": stored, "dtype": stored}


def tokenizer_in(folder: str) -> str | None:
    return next((os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))), None)


def convert_folder(
    folder: str,
    family: str | None = None,
    tokenizer_file: str | None = None,
    dtype: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Converted:
    """A released folder -> our config and params (numpy, config.param_dtype) with its family and
    tokenizer file. dtype: the stored parameter and compute dtype (default: the checkpoint's own,
    so fp16 stays fp16)."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ConversionError(f"input folder {folder} not found")
    layout, detected, cfg = detect(folder)
    fam = get_family(family or detected)
    if fam.name not in layout_families(layout):
        raise ConversionError(f"a {layout} folder holds a {'/'.join(layout_families(layout))} model, not {fam.name}")
    if layout == "glm130b-sat":
        return _convert_sat(folder, fam.name, tokenizer_file, dtype, dict(overrides or {}))
    tensors = ShardedTensors.open(folder)
    if layout in layouts.LAYOUTS:
        tensors = Renamed(tensors, layouts.LAYOUTS[layout].canonical)
    first = next(n for n in tensors if n.endswith("weight") and not any(k in n for k in ("norm", "embed", "ln")))
    source_dtype = tensors.dtype_of(first)
    stored = dtype or (source_dtype if source_dtype in ("float16", "bfloat16", "float32") else "float32")
    fields = {**_dtype_fields(stored), **(overrides or {})}
    try:
        config = _config_for(layout, cfg, fields)
    except ConfigError as e:
        raise ConversionError(f"{folder}/config.json: {e}") from None
    if layout in layouts.LAYOUTS:
        params = convert.convert_state_dict(tensors, config, layouts.LAYOUTS[layout].rules(config))
    else:
        rules = {
            "chatglm": convert.from_chatglm_state_dict,
            "chatglm2": convert.from_chatglm2_state_dict,
            "hf-glm": convert.from_hf_glm,
        }[layout]
        params = rules(tensors, config)
    return Converted(
        config, params, fam.name, tokenizer_file or tokenizer_in(folder), layout, source_dtype=source_dtype
    )


def sat_rank_files(folder: str) -> tuple[list[str], int]:
    """GLM-130B's rank files in rank order, and the iteration they belong to."""
    iteration = 0
    latest = os.path.join(folder, "latest")
    if os.path.isfile(latest):
        name = open(latest).read().strip()
        folder = os.path.join(folder, name)
        iteration = int(name) if name.isdigit() else 0
    elif os.path.basename(folder.rstrip("/")).isdigit():
        iteration = int(os.path.basename(folder.rstrip("/")))
    files = sorted(glob.glob(os.path.join(folder, "mp_rank_*_model_states.pt")))
    if not files:
        raise ConversionError(
            f"no mp_rank_XX_model_states.pt under {folder}; pass the reference's checkpoint "
            "folder (with `latest`) or one iteration's folder"
        )
    return files, iteration


def _convert_sat(folder, family, tokenizer_file, dtype, overrides) -> Converted:
    """GLM-130B's rank files (float, or INT4/INT8 loaded packed) -> our params. The reference stores
    fp16: that is kept unless `dtype` says otherwise."""
    torch = _torch()
    files, iteration = sat_rank_files(folder)
    try:  # the reference's files are pickles holding more than tensors
        ranks = [torch.load(f, map_location="cpu", weights_only=False, mmap=True)["module"] for f in files]
    except Exception as e:
        raise ConversionError(f"cannot read the rank files under {folder}: {type(e).__name__}: {e}") from None
    qkv = next((v for k, v in ranks[0].items() if k.endswith("attention.query_key_value.weight")), None)
    norm = next((v for k, v in ranks[0].items() if k.endswith("layernorm.weight")), None)
    source_dtype = DTYPES.get(str(norm.dtype), "float32") if norm is not None else "float16"
    stored = dtype or source_dtype
    config = get_config("glm-130b", **{**_dtype_fields(stored), **overrides})
    if any(k.endswith("weight_scale") for k in ranks[0]):
        bits = 4 if qkv is not None and qkv.shape[1] * 2 == config.hidden_size else 8
        config = config.override(quantization=f"int{bits}", quantization_groups=len(files) if len(files) > 1 else 0)
        params = convert.from_glm130b_quantized(ranks, config)
    else:
        params = convert.from_glm130b_state_dict(convert.merge_glm130b_ranks(ranks), config)
    return Converted(config, params, family, tokenizer_file, "glm130b-sat", iteration, source_dtype, len(files))
