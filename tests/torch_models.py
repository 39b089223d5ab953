"""Torch models the tests compare against: a tiny transformers GlmForCausalLM (GLM-4), and stand-ins for
ChatGLM-6B and ChatGLM2-6B with the released parameter names (whose modeling code is remote, not
available offline): peft wraps modules by name, so it makes, saves, loads and merges real LoRA folders
on them. The stand-ins have no forward: the tests compare weights (peft's merge_and_unload)."""

import torch
import transformers
from torch import nn


def tiny_glm4(vocab_size: int, hidden_size: int, intermediate_size: int, head_dim: int):
    """(config, model): a 2-layer GlmForCausalLM (4 heads, 2 KV groups, biased QKV, untied head), fp32,
    every parameter random (norms around 1) so every tensor matters; seeded."""
    torch.manual_seed(0)
    cfg = transformers.GlmConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        attention_bias=True,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = transformers.GlmForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return cfg, model


class Norm(nn.Module):
    """A norm's parameters only: weight (and a LayerNorm's bias)."""

    def __init__(self, e: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(e))
        if bias:
            self.bias = nn.Parameter(torch.zeros(e))


class ChatGLMAttention(nn.Module):
    def __init__(self, e: int, qkv_rows: int, inner: int, dense_bias: bool):
        super().__init__()
        self.query_key_value = nn.Linear(e, qkv_rows, bias=True)
        self.dense = nn.Linear(inner, e, bias=dense_bias)


class ChatGLMMLP(nn.Module):
    def __init__(self, e: int, h_to_4h: int, f: int, bias: bool):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(e, h_to_4h, bias=bias)
        self.dense_4h_to_h = nn.Linear(f, e, bias=bias)


class ChatGLMLayer(nn.Module):
    """ChatGLM-6B's `transformer.layers.{i}` (attention) or ChatGLM2's `transformer.encoder.layers.{i}`
    (self_attention): the same linears under two attribute names."""

    def __init__(self, c, chatglm2: bool):
        super().__init__()
        e, h, kv, d, f = c.hidden_size, c.num_attention_heads, c.num_kv_heads, c.head_dim, c.inner_hidden_size
        self.input_layernorm = Norm(e, bias=not chatglm2)
        attention = ChatGLMAttention(e, (h + 2 * kv) * d, h * d, dense_bias=not chatglm2)
        setattr(self, "self_attention" if chatglm2 else "attention", attention)
        self.post_attention_layernorm = Norm(e, bias=not chatglm2)
        self.mlp = ChatGLMMLP(e, 2 * f if c.gated_ffn else f, f, bias=not chatglm2)


class Layers(nn.Module):
    def __init__(self, c, chatglm2: bool):
        super().__init__()
        self.layers = nn.ModuleList([ChatGLMLayer(c, chatglm2) for _ in range(c.num_layers)])
        if chatglm2:
            self.final_layernorm = Norm(c.hidden_size, bias=False)


class ChatGLM6BTransformer(Layers):
    def __init__(self, c):
        super().__init__(c, chatglm2=False)
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.final_layernorm = Norm(c.hidden_size, bias=True)


class ChatGLM2Transformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embedding = nn.Module()
        self.embedding.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.encoder = Layers(c, chatglm2=True)
        self.output_layer = nn.Linear(c.hidden_size, c.vocab_size, bias=False)


class ChatGLMStandIn(nn.Module):
    """ChatGLM-6B (`chatglm2=False`: transformer.layers..., lm_head) or ChatGLM2-6B (`transformer.encoder...`,
    transformer.output_layer) for our config `c`, every parameter random (norms around 1)."""

    def __init__(self, c, chatglm2: bool, seed: int = 0):
        super().__init__()
        self.transformer = ChatGLM2Transformer(c) if chatglm2 else ChatGLM6BTransformer(c)
        if not chatglm2:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=gen) * 0.1
                p.copy_(noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """peft's CAUSAL_LM wrapper keeps a reference to this (the released models' generation hook)."""
        return {"input_ids": input_ids, **kwargs}

    def state_dict_numpy(self) -> dict:
        return {k: v.detach().numpy().copy() for k, v in self.state_dict().items()}
