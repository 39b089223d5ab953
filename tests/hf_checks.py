"""Checks the other families' tests share (tests/test_family_*.py): a tiny transformers model
saved, converted by `released.convert_folder`, and compared with transformers or with itself
(cached against full recomputation, LoRA, INT4)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jit_forward import forward

from glm_jax import sharding as sh
from glm_jax.generate import Generator, make_prompts
from glm_jax.optim import OptimConfig
from glm_jax.peft import PeftConfig, split
from glm_jax.quant import quantize_params
from glm_jax.released import convert_folder
from glm_jax.tokenizer import GLM_IDS, SpecialIds
from glm_jax.train import Trainer

PADDED = 32  # full-recomputation batches are padded to this length: one compile per config


def save_tiny(model, folder, style: str | None = None) -> str:
    """`model.save_pretrained(folder)` (safetensors), with a tokenizer of `style` beside it
    (tests/hf_tokenizers.py) when given."""
    model.save_pretrained(str(folder))
    if style is not None:
        from hf_tokenizers import write_tokenizer  # deferred: only the tests that name a style need tokenizers

        write_tokenizer(str(folder), style)
    return str(folder)


def convert(folder, **kw):
    """released.convert_folder in float32 -> (config, params as device arrays)."""
    result = convert_folder(os.fspath(folder), dtype="float32", **kw)
    return result.config, jax.tree_util.tree_map(jnp.asarray, result.params)


def causal_batch(ids) -> dict:
    """[B, S] ids -> a causal batch: one segment per row, positions 0..S-1, no part A."""
    ids = np.asarray(ids, np.int32)
    zeros = np.zeros_like(ids)
    return {
        "tokens": jnp.asarray(ids),
        "position_ids": jnp.asarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)),
        "block_position_ids": jnp.asarray(zeros),
        "segment_ids": jnp.asarray(zeros + 1),
        "prefix_mask": jnp.asarray(zeros),
    }


def our_logits(config, params, ids) -> np.ndarray:
    """Our logits [B, S, V] (float64) for [B, S] ids, causally, positions 0..S-1."""
    return np.asarray(forward(config, params, causal_batch(ids)), np.float64)


def torch_logits(model, ids) -> np.ndarray:
    """transformers' logits [B, S, V] (float64) for [B, S] ids."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.double().numpy()


def torch_greedy(model, prompt, steps: int) -> list[int]:
    """transformers' `generate(do_sample=False)`: `steps` new ids after `prompt`, no early stop."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.as_tensor([list(prompt)], dtype=torch.long),
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def assert_greedy_matches(config, params, model, prompts, steps: int) -> None:
    """Our cached greedy decoding continues each prompt as transformers' generate does."""
    ours = Generator(config, params, causal=True).generate(prompts, steps, stop_tokens=())
    for prompt, got in zip(prompts, ours):
        assert got == torch_greedy(model, prompt, steps), (prompt, got)


def _full_last_logits(config, params, prompt, generated, ids: SpecialIds, causal: bool) -> np.ndarray:
    """The logits of the last position of prompt (+ sop for a prefix LM) + generated, recomputed
    without a cache (the layout `generate.make_prompts` and `decoding.decode_layout` give)."""
    batch = make_prompts([prompt], config, ids, causal)
    n = int(batch.lengths[0])
    tokens = list(batch.tokens[0, :n]) + [int(batch.start[0])] + list(generated)
    k = len(generated) + 1
    cont, mask_pos = bool(batch.continue_positions[0]), int(batch.mask_pos[0])
    positions = list(range(n)) + (list(range(n, n + k)) if cont else [mask_pos] * k)
    blocks = [0] * n + (list(range(1, k + 1)) if config.position_encoding_2d else [0] * k)
    pad = [0] * (PADDED - n - k)
    b = dict(
        tokens=[tokens + pad],
        position_ids=[positions + pad],
        block_position_ids=[blocks + pad],
        segment_ids=[[1] * (n + k) + pad],
        prefix_mask=[([0] * n if causal else [1] * n) + [0] * k + pad],
    )
    b = {key: jnp.asarray(v, jnp.int32) for key, v in b.items()}
    return np.asarray(forward(config, params, b)[0, n + k - 1], np.float64)


def assert_cached_equals_full(config, params, prompts, steps: int, ids: SpecialIds = GLM_IDS, causal: bool = True):
    """Greedy cached decoding of `prompts` (ragged: one batch): at every step each row's logits
    equal a full forward's over its prompt and what it generated so far (1e-4)."""
    gen = Generator(config, params, ids=ids, causal=causal)
    batch = make_prompts(prompts, config, ids, causal)
    state = gen.start(batch, max_new_tokens=steps)
    token, generated = batch.start.copy(), [[] for _ in prompts]
    for step in range(steps):
        logits = np.asarray(gen.step(state, token, step))
        for i, prompt in enumerate(prompts):
            want = _full_last_logits(config, params, prompt, generated[i], ids, causal)
            np.testing.assert_allclose(logits[i], want, atol=1e-4, rtol=1e-4)
        token = logits.argmax(-1).astype(np.int32)
        for i in range(len(prompts)):
            generated[i].append(int(token[i]))


def export_reload(config, params, fmt: str, model_cls, folder, special_ids=None):
    """Our params exported as `fmt` (export.py) into `folder` and loaded back by transformers."""
    from glm_jax.export import export_tensors, write_folder

    tensors, cfg = export_tensors(params, config, fmt, "float32", special_ids)
    write_folder(os.fspath(folder), tensors, cfg)
    return model_cls.from_pretrained(os.fspath(folder)).eval()


def lora_step(config, params, steps: int = 2, seq: int = 16) -> list[float]:
    """LoRA (rank 4 on the default targets) trained `steps` Trainer steps on one causal batch of
    the base -> the losses (finite; the base's own loss first, since B starts at zero)."""
    peft = PeftConfig("lora", lora_rank=4, lora_dropout=0.0)
    model_config = peft.model_config(config)
    frozen = split(params, peft, model_config)[1]
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (2, seq + 1))
    batch = causal_batch(tokens[:, :-1])
    batch.update(targets=jnp.asarray(tokens[:, 1:], jnp.int32), loss_mask=jnp.ones((2, seq), jnp.int32))
    lr = 1e-2
    mesh = sh.make_mesh("1x1", jax.devices()[:1])
    trainer = Trainer(model_config, OptimConfig(peak_lr=lr, init_lr=lr), mesh, 2, peft=peft)
    trainer.set_frozen(frozen)
    losses = []
    with trainer.context():
        state = trainer.init_state(0)
        for _ in range(steps):
            state, metrics = trainer.fused_step(state, batch, jnp.float32(lr), jnp.float32(1.0))
            losses.append(float(metrics["loss"]))
    return losses


def int4_greedy(config, params, prompts, steps: int, ids: SpecialIds = GLM_IDS, causal: bool = True):
    """INT4 weight-only decoding (`quant.quantize_params`, one scale per output row) of `prompts`
    -> (int4 continuations, float continuations, the two models' first-step logits)."""
    int4 = config.override(quantization="int4")
    quantized = quantize_params(params, int4)
    runs = []
    for c, p in ((int4, quantized), (config, params)):
        gen = Generator(c, p, ids=ids, causal=causal)
        batch = make_prompts(prompts, c, ids, causal)
        state = gen.start(batch, max_new_tokens=steps)
        first = np.asarray(gen.step(state, batch.start, 0))
        runs.append((gen.generate(prompts, steps, stop_tokens=()), first))
    (q_tokens, q_first), (f_tokens, f_first) = runs
    return q_tokens, f_tokens, q_first, f_first
