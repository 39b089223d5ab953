"""Our parameters out again, in released layouts: safetensors shards, their index and config.json.

- `hf-glm`: transformers' `GlmForCausalLM` (the GLM-4 / ChatGLM2 block): loads with
  `GlmForCausalLM.from_pretrained(out)`;
- `chatglm2`: ChatGLM2-6B / ChatGLM3-6B's released names and config.json (fused QKV as
  [all q | k groups | v groups]); loads with `released.convert_folder`;
- `llama`, `bloom`, `opt`: transformers' LlamaForCausalLM / BloomForCausalLM / OPTForCausalLM
  (`layouts.py`: each layout module writes its own names and config.json).

Only a config with the matching block exports (pre-RMSNorm, SwiGLU, interleaved partial rotary,
no dense or FFN biases, ...); anything else is an `ExportError` naming the field. Quantized
parameters are dequantized first. A LoRA adapter alone goes out as a Hugging Face peft folder
(`peft_files.write_peft_folder`, `experiments/export.py --format peft`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import numpy as np

from glm_jax import layouts
from glm_jax.config import GLMConfig
from glm_jax.layout import ExportError, check_block
from glm_jax.peft import merge_adapters
from glm_jax.quant import dequantize_params
from glm_jax.tokenizer import sidecar_files

FORMATS = ("hf-glm", "chatglm2") + layouts.exportable()


NO_ADAPTERS = dict(pre_seq_len=0, num_virtual_tokens=0, adapter_size=0)  # no released layout holds them


def check_exportable(config: GLMConfig, fmt: str) -> None:
    """An ExportError naming every field a model of `config` differs in from the `fmt` block (the
    other families' layouts check their blocks themselves; no layout holds a P-tuning prefix,
    virtual tokens or bottleneck adapters)."""
    if fmt in layouts.LAYOUTS:
        check_block(config, NO_ADAPTERS, ExportError, f"a {fmt} model (no prefix, virtual tokens or adapters)")
        return
    want = dict(
        norm_kind="rmsnorm",
        norm_placement="pre",
        ffn_kind="swiglu",
        rotary_interleaved=True,
        position_encoding_2d=False,
        attention_dense_bias=False,
        ffn_bias=False,
        rotary_fp16_inv_freq=False,
        rotary_fp16_angles=False,
        final_norm=True,
        **NO_ADAPTERS,
    )
    if fmt == "chatglm2":
        want.update(tie_word_embeddings=False, qkv_bias=True, rotary_fraction=0.5)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    check_block(config, want, ExportError, f"the {fmt} block")


def _float_params(params: dict, config: GLMConfig) -> dict:
    if config.quantization != "none":
        return dequantize_params(params, config)
    return params


def _layers(params: dict, config: GLMConfig, name_of: Callable[[int, str], str], qkv_fused: bool, dtype):
    """Per-layer torch-layout tensors: {name: [out, in] array}."""
    c = config
    e, h, d, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.inner_hidden_size
    lay = params["layers"]
    att, mlp = lay["attention"], lay["mlp"]
    out = {}
    for i in range(c.num_layers):
        a = lambda n, leaf: np.asarray(att[n][leaf][i], np.float32)
        q, k, v = (a(n, "kernel").reshape(e, -1).T for n in ("query", "key", "value"))
        t = {
            "input_layernorm.weight": lay["input_layernorm"]["scale"][i],
            "post_attention_layernorm.weight": lay["post_attention_layernorm"]["scale"][i],
            "attention.dense.weight": a("dense", "kernel").reshape(h * d, e).T,
            "mlp.dense_h_to_4h.weight": np.asarray(mlp["dense_h_to_4h"]["kernel"][i])
            .transpose(1, 2, 0)
            .reshape(2 * f, e),
            "mlp.dense_4h_to_h.weight": np.asarray(mlp["dense_4h_to_h"]["kernel"][i]).T,
        }
        if qkv_fused:
            t["attention.qkv.weight"] = np.concatenate([q, k, v])
        else:
            t.update({"attention.q.weight": q, "attention.k.weight": k, "attention.v.weight": v})
        if c.qkv_bias:
            biases = [a(n, "bias").reshape(-1) for n in ("query", "key", "value")]
            if qkv_fused:
                t["attention.qkv.bias"] = np.concatenate(biases)
            else:
                t.update({f"attention.{n}.bias": b for n, b in zip("qkv", biases)})
        out.update({name_of(i, k2): np.ascontiguousarray(x, dtype) for k2, x in t.items()})
    return out


HF_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    **{f"attention.{x}.{w}": f"self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")},
}
CHATGLM2_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "attention.dense.weight": "self_attention.dense.weight",
    "mlp.dense_h_to_4h.weight": "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight": "mlp.dense_4h_to_h.weight",
    "attention.qkv.weight": "self_attention.query_key_value.weight",
    "attention.qkv.bias": "self_attention.query_key_value.bias",
}


def export_tensors(
    params: dict, config: GLMConfig, fmt: str, dtype: str = "float16", special_ids=None
) -> tuple[dict[str, np.ndarray], dict]:
    """(name -> numpy tensor in `dtype`, config.json dict) of the `fmt` layout."""
    check_exportable(config, fmt)
    c, np_dtype = config, numpy_dtype(dtype)
    params = _float_params(params, config)
    if c.lora_rank or c.ia3:  # an adapter on load (--adapter): folded into the exported weights
        params, c = merge_adapters(params, c.override(quantization="none"))
    if fmt in layouts.LAYOUTS:
        tensors, cfg = layouts.LAYOUTS[fmt].export(params, c, np_dtype, special_ids)
        return {n: np.ascontiguousarray(x, np_dtype) for n, x in tensors.items()}, cfg
    v = c.vocab_size
    embed = np.asarray(params["word_embeddings"]["embedding"])[:v]
    head = None if c.tie_word_embeddings else np.asarray(params["output_layer"]["kernel"])[:, :v].T
    final = params["final_layernorm"]["scale"]
    if fmt == "hf-glm":
        tensors = _layers(params, c, lambda i, n: f"model.layers.{i}.{HF_NAMES[n]}", False, np_dtype)
        tensors.update({"model.embed_tokens.weight": embed, "model.norm.weight": final})
        if head is not None:
            tensors["lm_head.weight"] = head
        rope = {"rope_theta": c.rotary_base, "partial_rotary_factor": c.rotary_fraction, "rope_type": "default"}
        cfg = {
            "architectures": ["GlmForCausalLM"],
            "model_type": "glm",
            "vocab_size": v,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.inner_hidden_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": c.max_sequence_length,
            "rms_norm_eps": c.layernorm_epsilon,
            "attention_bias": c.qkv_bias,
            "attention_dropout": 0.0,
            "tie_word_embeddings": c.tie_word_embeddings,
            "rope_parameters": rope,
            **rope,
            "dtype": dtype,
            "pad_token_id": None if special_ids is None else special_ids.pad,
            "eos_token_id": None if special_ids is None else special_ids.eos,
        }
    else:
        if c.rotary_base % 10000:
            raise ExportError(f"rotary_base={c.rotary_base}: ChatGLM2's config expresses it as rope_ratio x 10000")
        tensors = _layers(params, c, lambda i, n: f"transformer.encoder.layers.{i}.{CHATGLM2_NAMES[n]}", True, np_dtype)
        tensors.update(
            {
                "transformer.embedding.word_embeddings.weight": embed,
                "transformer.encoder.final_layernorm.weight": final,
                "transformer.output_layer.weight": head,
            }
        )
        cfg = {
            "architectures": ["ChatGLMModel"],
            "model_type": "chatglm",
            "num_layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "kv_channels": c.head_dim,
            "multi_query_attention": c.num_kv_heads != c.num_attention_heads,
            "multi_query_group_num": c.num_kv_heads,
            "ffn_hidden_size": c.inner_hidden_size,
            "padded_vocab_size": v,
            "layernorm_epsilon": c.layernorm_epsilon,
            "seq_length": c.max_sequence_length,
            "rope_ratio": c.rotary_base / 10000.0,
            "add_qkv_bias": True,
            "add_bias_linear": False,
            "rmsnorm": True,
            "post_layer_norm": True,
            "apply_residual_connection_post_layernorm": False,
            "torch_dtype": dtype,
        }
    return {n: np.ascontiguousarray(x, np_dtype) for n, x in tensors.items()}, cfg


def numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if dtype not in ("float16", "float32"):
        raise ExportError(f"dtype={dtype!r}; choose float16, bfloat16 or float32")
    return np.dtype(dtype)


def write_folder(
    out: str,
    tensors: dict[str, np.ndarray],
    config_json: dict,
    shard_bytes: int = 2 * 2**30,
    tokenizer_file: str | None = None,
) -> list[str]:
    """safetensors shards of at most shard_bytes (model-0000k-of-0000n.safetensors) with their index,
    config.json and the tokenizer file (a tokenizer.json with its sidecars but config.json), written
    beside `out` and renamed into place. -> shard names."""
    from safetensors.numpy import save_file

    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out} exists and is not empty; choose another output folder")
    shards, size = [[]], 0
    for name in tensors:
        n = tensors[name].nbytes
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        files, weight_map = [], {}
        for k, names in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, os.path.join(tmp, file), metadata={"format": "pt"})
            files.append(file)
            weight_map.update({n: file for n in names})
        total = int(sum(x.nbytes for x in tensors.values()))
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=1)
        if tokenizer_file:  # with a tokenizer.json's sidecars (its special and stop ids), not its config.json
            sidecars = [f for f in sidecar_files(tokenizer_file) if os.path.basename(f) != "config.json"]
            for file in [tokenizer_file, *(sidecars if tokenizer_file.endswith(".json") else [])]:
                shutil.copyfile(file, os.path.join(tmp, os.path.basename(file)))
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files
