"""PPO on one frozen base: rollouts sampled by the serving engine, actor and critic as adapters.

    ppo = PPO(base_config, base_params, tok.specials, fam.causal, fam.stop_ids(tok),
              PPOSettings(batch=8, max_new_tokens=32), PeftConfig("lora"), reward, max_prompt_len)
    for r in range(rounds):
        metrics = ppo.round(r, round_prompts(prompts, r, 8, seed))
    ppo.actor                                  # the trained LoRA, plain stacked layout
    ppo.close()

The RLHF stage of Ouyang et al. (2022) as trl's PPOTrainer and ColossalChat's run it (Schulman
et al. 2017's clipped objective, GAE of Schulman et al. 2016):

- One base, held once. The engine (`serving.engine.Engine`, config = base + the actor's LoRA)
  copies it into the serving layout (`generate.inference_params`, consume: the stacked copy is
  freed); every training forward reads those same arrays with the small adapter leaves put in
  (`engine.with_adapter`, inside the compiled program). The actor is a LoRA (fresh: B = 0, so it
  starts as the base); the critic a LoRA and a value head (`GLM.values`), initialised from the
  reward model's adapter when there is one (as ColossalChat does), else fresh; the reference is the
  base alone; the reward a reward-model adapter on the same base (its value at the answer's last
  token) or any Python function reward(prompt_ids, response_ids) -> float.
- A round: `batch` prompts sampled at temperature 1 by the engine, request i of round r seeded
  from (seed, r, i) (`rollout_seed`), with each sampled id's log-probability (the behaviour
  policy's, `Request.logprobs`) -> the reference's log-probabilities, the critic's values and the
  reward model's scores in one compiled forward over rows of fixed width -> per-token rewards
  -kl_coef x (logp - ref_logp) with the score added at the last response token
  (`alignment.kl_shaped_rewards`), advantages by GAE (gamma 1, lambda 0.95 as trl) whitened over the
  batch as trl does, returns = advantages + values -> `ppo_epochs` passes over minibatches (a fresh
  seeded shuffle each) of the clipped policy loss (`alignment.ppo_policy_loss`) on the actor and
  vf_coef x the clipped value loss (`alignment.ppo_value_loss`) on the critic, each with its own
  AdamW (no weight decay) after clipping its gradient norm to 1 (ColossalChat's two optimizers) ->
  `engine.set_adapter(actor)`: the next round samples from the new policy.
- A rollout row is laid out as the engine decoded it (`decoding.decode_layout`): the prompt's
  context (bidirectional for a prefix LM), its start id (sop, or a causal prompt's last id), then
  the response, right-padded to one width for every round; the forwards compute the hidden states
  of the whole row and the head only on the T + 1 positions from the start id (`window`), so the
  logits of a long prompt are never formed. Row j of the window predicts response token j; the
  reward model reads its value at the last answer token (the last response id before a stop id,
  which is where SFT's layout of prompt + answer puts the answer's last input).
- Every shape is fixed (rows of `batch` x width, minibatches of `minibatch`, T = max_new_tokens),
  so rounds after the first compile nothing. One device, or the engine's (data, 1, tensor) mesh
  (`mesh`): the base is placed by the rules there and the adapters with it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from glm_jax import placement
from glm_jax.adapters import Adapter
from glm_jax.alignment import gae, kl_shaped_rewards, masked_mean, ppo_policy_loss, ppo_value_loss, token_logprobs
from glm_jax.config import ConfigError, GLMConfig
from glm_jax.data import DataError
from glm_jax.decoding import BUCKET, bucket_length
from glm_jax.families import Family, FamilyError
from glm_jax.generate import PromptBatch, layered_hidden, make_prompts
from glm_jax.model import GLM, dummy_batch
from glm_jax.peft import PeftConfig, combine, split
from glm_jax.preference import prompt_messages
from glm_jax.serving.engine import Engine, Request, Sampling, adapter_paths, with_adapter
from glm_jax.sft import BadRow, SFTStats, read_rows, shuffled_index, text_field
from glm_jax.tokenizer import SpecialIds, Tokenizer
from glm_jax.train import as_master

RewardFn = Callable[[list[int], list[int]], float]  # (prompt ids, response ids without the stop id) -> score
ROW_FIELDS = ("tokens", "position_ids", "block_position_ids", "segment_ids", "prefix_mask")


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """One PPO run's knobs. Defaults: trl's (PPOTrainer: gamma 1, lambda 0.95, clip 0.2 for the
    ratio and the value, vf_coef 0.1, kl_coef 0.05, 4 PPO epochs over one minibatch; lr 1e-5 of
    its earlier PPOConfig); critic_lr 0 is lr."""

    batch: int = 8  # rollouts (prompts) per round
    minibatch: int = 0  # rollouts per optimizer step (0: the whole batch)
    ppo_epochs: int = 4
    max_new_tokens: int = 32
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    lr: float = 1e-5
    critic_lr: float = 0.0  # 0: lr
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.minibatch == 0:
            object.__setattr__(self, "minibatch", self.batch)
        if not self.critic_lr:
            object.__setattr__(self, "critic_lr", self.lr)
        for name in ("batch", "minibatch", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PPO {name} must be at least 1, got {getattr(self, name)}")
        if self.batch % self.minibatch:
            raise ConfigError(f"PPO batch {self.batch} is not a multiple of minibatch {self.minibatch}")
        for name in ("lr", "critic_lr", "cliprange", "cliprange_value", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"PPO {name} must be positive, got {getattr(self, name)}")
        if self.kl_coef < 0 or self.vf_coef < 0 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("PPO needs kl_coef >= 0, vf_coef >= 0 and gamma, lam in [0, 1]")


# ---- prompts ------------------------------------------------------------------------------------
@dataclasses.dataclass
class PromptStats:
    """What reading a prompt file kept and skipped."""

    rows: int = 0
    prompts: int = 0
    bad_json: int = 0
    missing_fields: int = 0
    too_long: int = 0

    def summary(self) -> dict:
        return dataclasses.asdict(self) | {"skipped": self.bad_json + self.missing_fields + self.too_long}


def prompt_turn(row: dict, family: Family) -> tuple[str | None, list[tuple[str, str]], str]:
    """A prompt row -> (system text or None, (query, reply) history rounds, query). Rows:
    {"prompt": str} (one query), {"prompt": [messages]} (trl's conversational prompts),
    {"messages": [messages]} (OpenAI's {"role", "content"} or ColossalChat's {"from", "content"},
    ending with the user's query), {"instruction", "input"?} (Alpaca). Raises BadRow."""
    if "messages" in row or isinstance(row.get("prompt"), list):
        messages = row["messages"] if "messages" in row else row["prompt"]
        role_key = "from" if messages and isinstance(messages[0], dict) and "from" in messages[0] else "role"
        return prompt_messages(messages, role_key)
    if "prompt" in row:
        return None, [], text_field(row["prompt"])
    if "instruction" in row:
        return None, [], family.instruction_query(text_field(row["instruction"]), text_field(row.get("input") or ""))
    raise BadRow("missing_fields")


def read_prompts(path: str, family: Family, tok: Tokenizer, limit: int) -> tuple[list[list[int]], PromptStats]:
    """Every usable row of a JSON lines (or JSON array) file -> model-ready chat prompts (the
    family's `chat_prompt`, as serve and chat build them), the oldest history rounds dropped until
    a prompt has at most `limit` ids (`Family.fit_chat`); rows that cannot be used are counted.
    DataError when none is usable."""
    stats, read = PromptStats(), SFTStats()
    out = []
    for row in read_rows(path, read):
        try:
            system, history, query = prompt_turn(row, family)
            ids, _ = family.fit_chat(tok, history, query, limit, system)
        except BadRow:
            stats.missing_fields += 1
            continue
        except FamilyError:
            stats.too_long += 1
            continue
        out.append(ids)
    stats.rows, stats.bad_json, stats.prompts = read.rows, read.bad_json, len(out)
    if not out:
        raise DataError(f"no usable prompt in {path}: {stats.summary()}")
    return out, stats


def round_prompts(prompts: Sequence, round_index: int, batch: int, seed: int) -> list:
    """Round r's `batch` prompts: items r*batch .. (r+1)*batch - 1 of the prompts in a fresh seeded
    order per pass over them (a pure function of (seed, r))."""
    return [
        prompts[shuffled_index(seed, k, len(prompts))] for k in range(round_index * batch, (round_index + 1) * batch)
    ]


def rollout_seed(seed: int, round_index: int, i: int) -> int:
    """The sampling seed of round r's request i: a hash of (seed, r, i)."""
    return int(np.random.SeedSequence([seed, round_index, i]).generate_state(1)[0])


# ---- rows ---------------------------------------------------------------------------------------
def row_width(max_prompt_len: int, max_new_tokens: int) -> int:
    """The fixed width of a rollout row: a model-ready prompt of up to max_prompt_len ids with its
    start id (a prefix LM's sop, appended when missing), padded to a multiple of 16, then the
    response."""
    return bucket_length(max_prompt_len + 1, multiple=BUCKET) + max_new_tokens


def rollout_rows(
    batch: PromptBatch, responses: Sequence[Sequence[int]], width: int, max_new_tokens: int, two_d: bool, pad: int
) -> tuple[dict, np.ndarray]:
    """Prompts (`generate.make_prompts`) and their responses -> the rows the engine decoded, as the
    batch contract's input fields (each [B, width] int32), and window [B, T + 1]: the row index of
    each prompt's start id and of its T response slots. Positions follow `decoding.decode_layout`:
    the context at 0..L-1, generated id s (the start id is s = 0) at L + s when positions continue
    (1D [gMASK], causal), else at the mask position with block position s + 1 (2D)."""
    rows = {key: np.zeros((len(responses), width), np.int32) for key in ROW_FIELDS}
    rows["tokens"][:] = pad
    for i, response in enumerate(responses):
        length, n = int(batch.lengths[i]), len(response)
        end = length + 1 + n
        if end > width:
            raise ValueError(f"a prompt of {length + 1} ids and {n} response ids do not fit a row of {width}")
        steps = np.arange(n + 1)
        rows["tokens"][i, :end] = np.concatenate([batch.tokens[i, :length], [batch.start[i]], response])
        rows["position_ids"][i, :length] = np.arange(length)
        rows["position_ids"][i, length:end] = length + steps if batch.continue_positions[i] else batch.mask_pos[i]
        if two_d:
            rows["block_position_ids"][i, length:end] = steps + 1
        rows["segment_ids"][i, :end] = 1
        rows["prefix_mask"][i, :length] = not batch.causal
    window = np.minimum(batch.lengths[:, None] + np.arange(max_new_tokens + 1)[None], width - 1).astype(np.int32)
    return rows, window


# ---- forwards on serving-layout params ---------------------------------------------------------------
def window_hidden(config: GLMConfig, params: dict, rows: dict, window):
    """The hidden states at the window's row positions: rows [B, S], window [B, W] -> [B, W, E]."""
    h = layered_hidden(config, params, rows)
    return jnp.take_along_axis(h, window[..., None], axis=1)


def policy_logprobs(config: GLMConfig, params: dict, rows: dict, window, responses):
    """log pi(response token j) from window row j: responses [B, T] -> (log-probabilities [B, T]
    fp32, entropies of the predicted distributions [B, T])."""
    hidden = window_hidden(config, params, rows, window[:, :-1])
    outer = {key: value for key, value in params.items() if key != "layers"}
    logits = GLM(config).apply({"params": outer}, hidden, method=GLM.head).astype(jnp.float32)
    entropy = jax.nn.logsumexp(logits, -1) - jnp.sum(jax.nn.softmax(logits, -1) * logits, -1)
    return token_logprobs(logits, responses), entropy


def window_values(config: GLMConfig, params: dict, rows: dict, window):
    """The value head's scalar at each window position (`GLM.values`): -> [B, W] fp32."""
    hidden = window_hidden(config, params, rows, window)
    outer = {key: value for key, value in params.items() if key != "layers"}
    return GLM(config).apply({"params": outer}, hidden, method=GLM.values)


def masked_whiten(x, mask):
    """trl's masked_whiten: (x - mean) / sqrt(var + 1e-8) with the masked mean and unbiased
    variance, 0 at masked places. x, mask [B, T]."""
    n = jnp.maximum(mask.sum(), 2.0)
    mean = jnp.sum(x * mask) / n
    var = jnp.sum((x - mean) ** 2 * mask) / (n - 1.0)
    return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def fresh_adapter(config: GLMConfig, peft: PeftConfig, key) -> dict:
    """A new adapter's parameters (plain stacked layout, fp32): the model's init of its trainable
    leaves (LoRA: A random, B zero; a value head), the base's random init dead code XLA drops."""

    def init(key):
        params = nn.meta.unbox(GLM(config).init(key, dummy_batch(1, 8))["params"])
        return as_master(split(params, peft, config)[0])

    return jax.jit(init)(key)


def without_adapter(config: GLMConfig, params: dict) -> dict:
    """Serving-layout params without their adapter leaves (`engine.adapter_paths`): the base's
    own arrays, nothing copied."""
    drop = adapter_paths(config, params)
    outer = traverse_util.flatten_dict({key: value for key, value in params.items() if key != "layers"})
    outer = {path: leaf for path, leaf in outer.items() if path not in drop}
    layers = tuple(
        traverse_util.unflatten_dict(
            {path: leaf for path, leaf in traverse_util.flatten_dict(layer).items() if ("layers", *path) not in drop}
        )
        for layer in params["layers"]
    )
    return {**(traverse_util.unflatten_dict(outer) if outer else {}), "layers": layers}


# ---- the trainer -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Rollouts:
    """One round's rollouts. arrays, fixed shapes (B rollouts, T = max_new_tokens, S = the row
    width): rows (`ROW_FIELDS`, each [B, S]), window [B, T + 1], response [B, T] (pad past the end),
    mask [B, T], logp [B, T] (the engine's behaviour log-probabilities, 0 past the end), last [B]
    (the window index of the last answer token, where the reward model reads its value)."""

    prompts: list[list[int]]
    responses: list[list[int]]  # the sampled ids, the stop id included when one ended it
    stopped: np.ndarray  # [B] bool: the response ended with a stop id
    arrays: dict


class PPO:
    """The PPO stage on one frozen base (module docstring). config / params: the base (plain
    stacked layout; consumed: the engine re-lays it out and frees the stacked copy); ids, causal,
    stop_ids: the family's; lora: the actor's LoRA knobs (and a fresh critic's); reward: a
    reward-model `adapters.Adapter` on this base (with a value head) or a function
    reward(prompt_ids, response_ids) -> float; max_prompt_len: the longest model-ready prompt a
    round will get (fixes the row width); mesh: an inference (data, 1, tensor) mesh, or None;
    slots: the engine's decode slots (default: one per rollout of a round)."""

    def __init__(
        self,
        config: GLMConfig,
        params: dict,
        ids: SpecialIds,
        causal: bool,
        stop_ids: Sequence[int],
        settings: PPOSettings,
        lora: PeftConfig,
        reward: Adapter | RewardFn,
        max_prompt_len: int,
        mesh: jax.sharding.Mesh | None = None,
        slots: int | None = None,
    ):
        if lora.method != "lora" or lora.value_head:
            raise ConfigError(f"the actor is a LoRA adapter without a value head, got method {lora.method!r}")
        self.s, self.ids, self.causal, self.stop_ids, self.mesh = settings, ids, causal, tuple(stop_ids), mesh
        self.base_config, self.lora = config, lora
        self.actor_config = lora.model_config(config)
        actor_key, critic_key = jax.random.split(jax.random.key(settings.seed))
        self.actor = self._place(fresh_adapter(self.actor_config, lora, actor_key), self.actor_config)
        if isinstance(reward, Adapter):
            self.reward_fn, rm_peft = None, reward.peft
            if not rm_peft.value_head:
                raise ConfigError(
                    f"the reward model {reward.path} has no value head: train one with --objective reward"
                )
            self.reward_config = rm_peft.model_config(config)
            self.reward_params = self._place(reward.params, self.reward_config)
            # ColossalChat's critic starts as the reward model (a copy: the training steps donate it)
            self.critic_config = self.reward_config
            self.critic = self._place(jax.tree_util.tree_map(jnp.copy, as_master(reward.params)), self.critic_config)
        else:
            self.reward_fn, self.reward_config, self.reward_params = reward, None, None
            critic_peft = dataclasses.replace(lora, value_head=True)
            self.critic_config = critic_peft.model_config(config)
            self.critic = self._place(fresh_adapter(self.critic_config, critic_peft, critic_key), self.critic_config)
        self.width = row_width(max_prompt_len, settings.max_new_tokens)
        start = combine(jax.tree_util.tree_map(jnp.copy, self.actor), params, lora)  # the engine consumes its copy
        self.engine = Engine(
            self.actor_config,
            start,
            ids,
            causal,
            slots=slots or settings.batch,
            max_queue=settings.batch,
            mesh=mesh,
            consume=True,
        )
        self.engine.start()
        self.base = without_adapter(self.actor_config, self.engine.params)  # the engine's arrays, shared
        self.tx = {
            name: optax.chain(optax.clip_by_global_norm(settings.max_grad_norm), optax.adam(lr))
            for name, lr in (("actor", settings.lr), ("critic", settings.critic_lr))
        }
        self.opt = {name: self._commit(self.tx[name].init(getattr(self, name))) for name in ("actor", "critic")}
        self._experience = jax.jit(self._experience_fn)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))

    def _place(self, tree: dict, config: GLMConfig) -> dict:
        """An adapter placed where it trains: on the mesh by the rules, else `_commit`."""
        return self._commit(tree) if self.mesh is None else placement.place(tree, config, self.mesh)

    def _commit(self, tree):
        """One device: the tree committed to it, as the compiled steps' outputs are, so every
        round's calls see the same placements and compile once. A mesh: as it is."""
        return jax.device_put(tree, jax.devices()[0]) if self.mesh is None else tree

    def close(self) -> None:
        self.engine.stop()

    # ---- rollouts ----------------------------------------------------------------------------
    def rollout(self, round_index: int, prompts: Sequence[Sequence[int]]) -> Rollouts:
        """The engine samples each prompt (temperature 1, seeded by (seed, round, i)) ->
        `Rollouts` of fixed shapes."""
        T, n = self.s.max_new_tokens, len(prompts)
        if n != self.s.batch:
            raise ValueError(f"a round takes {self.s.batch} prompts, got {n}")
        remaining, done = [n], threading.Event()

        def on_done(reason, generated):
            remaining[0] -= 1
            if not remaining[0]:
                done.set()

        requests, responses = [], [[] for _ in range(n)]
        for i, prompt in enumerate(prompts):
            sampling = Sampling(1.0, seed=rollout_seed(self.s.seed, round_index, i))
            req = Request(prompt, T, sampling, self.stop_ids, on_token=responses[i].append, on_done=on_done)
            req.logprobs = []
            requests.append(req)
        for req in requests:
            self.engine.submit(req)
        done.wait()
        if self.engine.error is not None:
            raise self.engine.error
        batch = make_prompts(prompts, self.base_config, self.ids, self.causal)
        rows, window = rollout_rows(
            batch, responses, self.width, T, self.base_config.position_encoding_2d, self.ids.pad
        )
        stopped = np.array([req.finish_reason == "stop" for req in requests])
        response, mask, logp = (
            np.full((n, T), self.ids.pad, np.int32),
            np.zeros((n, T), np.float32),
            np.zeros((n, T), np.float32),
        )
        for i, (ids, req) in enumerate(zip(responses, requests)):
            response[i, : len(ids)], mask[i, : len(ids)], logp[i, : len(ids)] = ids, 1.0, req.logprobs
        last = np.array([len(ids) - int(s) for ids, s in zip(responses, stopped)], np.int32)
        arrays = dict(rows=rows, window=window, response=response, mask=mask, logp=logp, last=last)
        return Rollouts([list(p) for p in prompts], responses, stopped, arrays)

    # ---- the compiled pieces -----------------------------------------------------------------
    def _experience_fn(self, base, critic, reward_params, arrays, external_score):
        """Reference log-probabilities, old values, scores, KL-shaped rewards, whitened GAE
        advantages and returns of one round's rollouts (trl's PPOTrainer.train before its epochs)."""
        rows, window, mask = arrays["rows"], arrays["window"], arrays["mask"]
        T = self.s.max_new_tokens
        ref_logp, _ = policy_logprobs(self.base_config, base, rows, window, arrays["response"])
        values = window_values(self.critic_config, with_adapter(base, critic), rows, window)[:, :T] * mask
        if reward_params is None:
            score = external_score
        else:
            rm = window_values(self.reward_config, with_adapter(base, reward_params), rows, window)
            score = jnp.take_along_axis(rm, arrays["last"][:, None], axis=1)[:, 0]
        rewards, kl = kl_shaped_rewards(score, arrays["logp"], ref_logp, mask, self.s.kl_coef)
        advantages, returns = gae(rewards, values, self.s.gamma, self.s.lam, mask)
        return dict(
            score=score,
            kl=kl,
            values=values,
            returns=returns,
            advantages=masked_whiten(advantages, mask),
            ref_logp=ref_logp * mask,
        )

    def _step_fn(self, base, state, mb):
        """One optimizer step of the actor (clipped policy loss) and the critic (vf_coef x the
        clipped value loss) on a minibatch -> (state, metrics)."""
        T, mask = self.s.max_new_tokens, mb["mask"]

        def policy_loss(actor):
            logp, entropy = policy_logprobs(
                self.actor_config, with_adapter(base, actor), mb["rows"], mb["window"], mb["response"]
            )
            loss, metrics = ppo_policy_loss(logp, mb["logp"], mb["advantages"], self.s.cliprange, mask)
            return loss, {
                "pg_clip_fraction": metrics["clip_fraction"],
                "approx_kl": metrics["approx_kl"],
                "entropy": masked_mean(entropy, mask),
            }

        def value_loss(critic):
            values = window_values(self.critic_config, with_adapter(base, critic), mb["rows"], mb["window"])[:, :T]
            loss, metrics = ppo_value_loss(values, mb["values"], mb["returns"], self.s.cliprange_value, mask)
            return self.s.vf_coef * loss, {"vf_loss": loss, "vf_clip_fraction": metrics["clip_fraction"]}

        (pg_loss, pg_metrics), actor_grads = jax.value_and_grad(policy_loss, has_aux=True)(state["actor"])
        (_, vf_metrics), critic_grads = jax.value_and_grad(value_loss, has_aux=True)(state["critic"])
        out = dict(state)
        for name, grads in (("actor", actor_grads), ("critic", critic_grads)):
            updates, out[f"{name}_opt"] = self.tx[name].update(grads, state[f"{name}_opt"], state[name])
            out[name] = optax.apply_updates(state[name], updates)
        return out, {"pg_loss": pg_loss, **pg_metrics, **vf_metrics}

    # ---- a round -----------------------------------------------------------------------------
    def score(self, rollouts: Rollouts) -> np.ndarray:
        """The Python reward function's score of each rollout [B] (zeros with a reward model)."""
        if self.reward_fn is None:
            return np.zeros(len(rollouts.prompts), np.float32)
        return np.array(
            [
                self.reward_fn(prompt, response[: len(response) - int(stop)])
                for prompt, response, stop in zip(rollouts.prompts, rollouts.responses, rollouts.stopped)
            ],
            np.float32,
        )

    def round(self, round_index: int, prompts: Sequence[Sequence[int]]) -> dict:
        """Rollouts, experience, `ppo_epochs` passes of minibatch steps, the engine's adapter
        updated -> the round's metrics (means over the batch; losses over its steps)."""
        t0 = time.perf_counter()
        rollouts = self.rollout(round_index, prompts)
        t1 = time.perf_counter()
        arrays = rollouts.arrays
        exp = self._experience(self.base, self.critic, self.reward_params, arrays, self.score(rollouts))
        data = {**arrays, **{k: exp[k] for k in ("values", "returns", "advantages")}}
        state = {
            "actor": self.actor,
            "critic": self.critic,
            "actor_opt": self.opt["actor"],
            "critic_opt": self.opt["critic"],
        }
        steps = []
        for epoch in range(self.s.ppo_epochs):
            order = np.random.default_rng([self.s.seed, round_index, epoch]).permutation(self.s.batch)
            for at in range(0, self.s.batch, self.s.minibatch):
                pick = order[at : at + self.s.minibatch]
                mb = jax.tree_util.tree_map(lambda x: x[pick], data)
                state, metrics = self._step(self.base, state, mb)
                steps.append(metrics)
        self.actor, self.critic = state["actor"], state["critic"]
        self.opt = {"actor": state["actor_opt"], "critic": state["critic_opt"]}
        self.engine.set_adapter(self.actor)
        t2 = time.perf_counter()
        return self._metrics(round_index, rollouts, exp, steps) | {
            "seconds": t2 - t0,
            "rollout_seconds": t1 - t0,
            "train_seconds": t2 - t1,
        }

    def _metrics(self, round_index: int, rollouts: Rollouts, exp: dict, steps: list[dict]) -> dict:
        mask = rollouts.arrays["mask"]
        tokens = mask.sum(-1)
        kl = np.asarray(exp["kl"]) * mask
        score = np.asarray(exp["score"])
        out = {
            "round": round_index,
            "reward": float(score.mean()),
            "reward_std": float(score.std()),
            "kl_per_token": float(kl.sum() / max(1.0, tokens.sum())),
            "kl_per_sequence": float(kl.sum(-1).mean()),
            "rlhf_reward": float((score - self.s.kl_coef * kl.sum(-1)).mean()),
            "response_length": float(tokens.mean()),
            "stopped_fraction": float(rollouts.stopped.mean()),
            "value_mean": float(masked_mean(exp["values"], mask)),
            "return_mean": float(masked_mean(exp["returns"], mask)),
        }
        for key in steps[0]:
            out[key] = float(np.mean([float(step[key]) for step in steps]))
        return out
