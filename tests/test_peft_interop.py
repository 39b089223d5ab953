"""Hugging Face peft LoRA folders in and out (glm_jax/peft_files.py): adapters made with peft on a tiny
transformers GlmForCausalLM give peft's logits through `load_model(..., adapter=DIR)`; on the ChatGLM
layouts (torch stand-ins with the released names, tests/torch_models.py) our merge equals peft's
merge_and_unload; what `export.py --format peft` writes loads in peft with the same outputs."""

import copy
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jit_forward import forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

from torch_models import ChatGLMStandIn, tiny_glm4  # noqa: E402

from glm_jax.adapters import Adapter, attach, load_adapter, save_adapter  # noqa: E402
from glm_jax.checkpoints import CheckpointError, move_to_device, save_serving  # noqa: E402
from glm_jax.convert import (  # noqa: E402
    config_from_chatglm,
    config_from_chatglm2,
    config_from_hf_glm,
    from_chatglm2_state_dict,
    from_chatglm_state_dict,
    from_hf_glm,
)
from glm_jax.export import ExportError  # noqa: E402
from glm_jax.loading import load_model  # noqa: E402
from glm_jax.peft import PeftConfig, base_identity, merge_lora, split_shapes  # noqa: E402
from glm_jax.peft_files import PeftFolderError, peft_tensors, read_adapter, write_peft_folder  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import export as export_script  # noqa: E402

FP32 = dict(dtype="float32", param_dtype="float32")
HF_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def randomize_lora(peft_model, seed: int):
    """Non-zero B (and DoRA magnitudes off ||W||) so that a wrong conversion shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if "lora_B" in name:
                p.copy_(noise)
            elif "lora_magnitude" in name:
                p.mul_(1.0 + noise)
    return peft_model.eval()


def random_adapter(peft: PeftConfig, base_config, seed: int) -> Adapter:
    """Our LoRA adapter with every leaf random (B and the DoRA deltas too)."""
    config = peft.model_config(base_config)
    rng = np.random.default_rng(seed)
    leaves = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.1, jnp.float32), split_shapes(peft, config)[0]
    )
    return Adapter(config, peft, leaves, 0, {}, "memory")


def flat_np(tree) -> dict:
    return {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(tree).items()}


# ---- GLM-4: transformers' GlmForCausalLM -------------------------------------------------------------
@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    """A tiny GlmForCausalLM (vocab 32000: our bundled tokenizer fits, so load_model takes it), our
    conversion of it saved as a serving checkpoint, and a batch."""
    cfg, model = tiny_glm4(vocab_size=32000, hidden_size=32, intermediate_size=48, head_dim=8)
    c = config_from_hf_glm(cfg, **FP32)
    params = from_hf_glm(model.state_dict(), c)
    root = tmp_path_factory.mktemp("peft")
    save_serving(str(root / "base"), c, move_to_device(copy.deepcopy(params)), 0, "test")
    tokens = np.random.default_rng(0).integers(0, 32000, (2, 9))
    batch = dict(
        tokens=tokens,
        position_ids=np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
        segment_ids=np.ones_like(tokens),
        prefix_mask=np.zeros_like(tokens),
    )
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    with torch.no_grad():
        base_logits = model(torch.from_numpy(tokens)).logits.numpy()
    return dict(model=model, config=c, params=params, root=root, tokens=tokens, batch=batch, base_logits=base_logits)


def peft_logits(peft_model, tokens) -> np.ndarray:
    with torch.no_grad():
        return peft_model(torch.from_numpy(tokens)).logits.numpy()


GLM4_CASES = {
    # every linear, read through load_model as every script's --adapter does
    "separate": dict(target_modules=HF_ALL),
    # rsLoRA; another rank and alpha on o_proj (rank_pattern / alpha_pattern)
    "rslora": dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_rslora=True,
        rank_pattern={"o_proj": 2},
        alpha_pattern={"o_proj": 3},
    ),
    # DoRA on the second layer only (layers_to_transform: the first keeps the base)
    "dora": dict(target_modules=HF_ALL, use_dora=True, layers_to_transform=[1]),
}


@pytest.mark.parametrize("case", list(GLM4_CASES))
def test_peft_lora_on_glm4_gives_peft_logits(glm4, case):
    kw = GLM4_CASES[case]
    lora = hf_peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **kw)
    pm = randomize_lora(hf_peft.get_peft_model(copy.deepcopy(glm4["model"]), lora), seed=1)
    folder = glm4["root"] / f"hf_{case}"
    pm.save_pretrained(str(folder))
    want = peft_logits(pm, glm4["tokens"])
    assert np.abs(want - glm4["base_logits"]).max() > 1e-2  # the adapter matters
    if case == "separate":
        m = load_model(str(glm4["root"] / "base"), adapter=str(folder))
        config, params = m.config, m.params
    else:
        adapter = read_adapter(str(folder), glm4["config"], glm4["params"])
        config, params = attach(adapter, glm4["config"], glm4["params"])
    assert config.lora_rslora == bool(kw.get("use_rslora")) and config.lora_dora == bool(kw.get("use_dora"))
    np.testing.assert_allclose(np.asarray(forward(config, params, glm4["batch"])), want, atol=1e-4, rtol=1e-4)


# ---- ChatGLM-6B and ChatGLM2 layouts: torch stand-ins -------------------------------------------------
CHATGLM = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, inner_hidden_size=48)
CHATGLM2 = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    kv_channels=8,
    multi_query_group_num=2,
    ffn_hidden_size=48,
    padded_vocab_size=100,
)
LAYOUTS = {
    "chatglm": (lambda: config_from_chatglm(CHATGLM, **FP32), False, from_chatglm_state_dict),
    "chatglm2": (lambda: config_from_chatglm2(CHATGLM2, **FP32), True, from_chatglm2_state_dict),
}


def stand_in(layout: str):
    make_config, chatglm2, convert = LAYOUTS[layout]
    c = make_config()
    model = ChatGLMStandIn(c, chatglm2)
    return c, model, convert, convert(model.state_dict_numpy(), c)


def peft_merged(peft_model, c, convert) -> dict:
    """peft's merge_and_unload, converted with our released converter."""
    merged = peft_model.merge_and_unload()
    return flat_np(convert({k: v.detach().numpy() for k, v in merged.state_dict().items()}, c))


def assert_merged_equal(ours: dict, want: dict, base: dict):
    ours, base = flat_np(ours), flat_np(base)
    assert ours.keys() == want.keys()
    assert max(np.abs(want[k] - base[k]).max() for k in want) > 1e-2  # the adapter matters
    for k in want:
        np.testing.assert_allclose(ours[k], want[k], atol=1e-5, err_msg="/".join(k))


@pytest.mark.parametrize(
    "layout,targets,kw",
    [
        # target_modules as a regex over module paths, saved as adapter_model.bin
        ("chatglm", r".*\.(query_key_value|dense_4h_to_h)", {}),
        ("chatglm2", ["query_key_value", "dense", "dense_h_to_4h"], dict(use_dora=True)),
    ],
)
def test_peft_fused_qkv_on_chatglm_layouts_merges_as_peft(tmp_path, layout, targets, kw):
    c, model, convert, base = stand_in(layout)
    pm = randomize_lora(
        hf_peft.get_peft_model(model, hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw)), 2
    )
    pm.save_pretrained(str(tmp_path), safe_serialization=isinstance(targets, list))
    assert (tmp_path / "adapter_model.bin").exists() != isinstance(targets, list)
    want = peft_merged(pm, c, convert)
    adapter = read_adapter(str(tmp_path), c, base)
    assert adapter.peft_layout == layout and adapter.peft.lora_targets.startswith("query_key_value")
    config, params = attach(adapter, c, base)
    assert "lora_a" in params["layers"]["attention"]["query_key_value"]  # one A shared by Q, K, V
    assert_merged_equal(merge_lora(params, config)[0], want, base)


# ---- export: ours -> peft ---------------------------------------------------------------------------
def test_export_script_writes_what_peft_loads_on_glm4(glm4):
    """Independent query/key/value and dense with rsLoRA, saved as our adapter, exported by
    experiments/export.py --format peft, loaded by peft on the GlmForCausalLM: the same logits."""
    c, root = glm4["config"], glm4["root"]
    peft = PeftConfig("lora", lora_rank=4, lora_alpha=8, lora_targets="query,key,value,dense", lora_rslora=True)
    adapter = random_adapter(peft, c, seed=3)
    identity = base_identity(c, load_model(str(root / "base")).params, 0)
    ours_dir = save_adapter(
        str(root / "ours"), adapter.config, peft, move_to_device(adapter.params), 0, identity, "glm", None
    )
    out = root / "exported"
    args = ["--checkpoint", str(root / "base"), "--adapter", ours_dir, "--out", str(out), "--format", "peft"]
    result = export_script.main(args + ["--layout", "hf-glm"])
    assert result["layout"] == "hf-glm" and result["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    m = load_model(str(root / "base"), adapter=ours_dir)
    ours = np.asarray(forward(m.config, m.params, glm4["batch"]))
    pm = hf_peft.PeftModel.from_pretrained(copy.deepcopy(glm4["model"]), str(out)).eval()
    np.testing.assert_allclose(ours, peft_logits(pm, glm4["tokens"]), atol=1e-4, rtol=1e-4)
    assert np.abs(ours - glm4["base_logits"]).max() > 1e-2


@pytest.mark.parametrize(
    "layout,kw",
    [
        # independent Q, K, V -> the fused module's rank-3r LoRA (block-diagonal B), with DoRA
        ("chatglm2", dict(lora_targets="query,key,value,dense_h_to_4h", lora_dora=True)),
        # our fused query_key_value (one shared A) with rsLoRA
        ("chatglm", dict(lora_targets="query_key_value,dense", lora_rslora=True)),
    ],
)
def test_export_to_fused_layouts_merges_as_peft(tmp_path, layout, kw):
    c, model, convert, base = stand_in(layout)
    adapter = random_adapter(PeftConfig("lora", lora_rank=4, lora_alpha=8, **kw), c, seed=4)
    config, params = attach(adapter, c, base)
    ours = merge_lora(params, config)[0]
    summary = write_peft_folder(str(tmp_path / "out"), config, params, layout)
    assert summary["rank_pattern"] == ({} if "query_key_value" in kw["lora_targets"] else {"query_key_value": 12})
    pm = hf_peft.PeftModel.from_pretrained(model, str(tmp_path / "out"))
    assert_merged_equal(ours, peft_merged(pm, c, convert), base)
    back_config, back = attach(read_adapter(str(tmp_path / "out"), c, base), c, base)  # read back: the same merge
    back = merge_lora(back, back_config)[0]
    for name in ("query", "key", "value"):
        np.testing.assert_allclose(
            np.asarray(back["layers"]["attention"][name]["kernel"]),
            np.asarray(ours["layers"]["attention"][name]["kernel"]),
            atol=1e-5,
        )


def test_export_refuses_what_peft_cannot_hold(glm4):
    c = glm4["config"]
    with pytest.raises(ExportError, match="no LoRA"):
        peft_tensors(c, glm4["params"], "hf-glm")
    with pytest.raises(ExportError, match="P-tuning v2 prefix"):
        peft_tensors(c.override(lora_rank=4, pre_seq_len=8), glm4["params"], "hf-glm")
    with pytest.raises(ExportError, match="does not have the chatglm layout's block"):
        peft_tensors(c.override(lora_rank=4), glm4["params"], "chatglm")


# ---- bad folders --------------------------------------------------------------------------------------
def _edited(src, dst, **fields):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(fields)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_bad_peft_folders_are_clear_errors(glm4, tmp_path):
    from safetensors.numpy import load_file, save_file

    c, params = glm4["config"], glm4["params"]
    pm = hf_peft.get_peft_model(copy.deepcopy(glm4["model"]), hf_peft.LoraConfig(r=4, target_modules=["k_proj"]))
    good = tmp_path / "good"
    randomize_lora(pm, 5).save_pretrained(str(good))
    for field, value, match in [
        ("bias", "all", "bias='all'"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
        ("peft_type", "PREFIX_TUNING", "only LoRA"),
        ("target_modules", ["q_proj"], "does not select"),
        ("r", 8, "rank 4, but r / rank_pattern give"),
    ]:
        with pytest.raises(PeftFolderError, match=match):
            read_adapter(_edited(good, tmp_path / field, **{field: value}), c, params)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # peft resets it on nn.Linear, and so do we
        read_adapter(_edited(good, tmp_path / "fan", fan_in_fan_out=True), c, params)
    tensors = load_file(str(good / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    shapes = tmp_path / "shape"
    shutil.copytree(good, shapes)
    save_file({**tensors, name: tensors[name][:8]}, str(shapes / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"k_proj.lora_B.weight has shape \(8, 4\); this base needs \(16, 4\)"):
        load_model(str(glm4["root"] / "base"), adapter=str(shapes))
    save_file(
        {**tensors, "base_model.model.lm_head.lora_A.weight": tensors[name]}, str(shapes / "adapter_model.safetensors")
    )
    with pytest.raises(PeftFolderError, match="lm_head.lora_A.weight is not a LoRA tensor of the hf-glm layout"):
        read_adapter(str(shapes), c, params)
    with pytest.raises(CheckpointError, match="read against its base"):
        load_adapter(str(good))
