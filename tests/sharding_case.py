"""The model, parameters and batch shared by the sharding tests and the multi-process worker."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import pipeline
from glm_jax import sharding as sh
from glm_jax.config import get_config
from glm_jax.data import DataIterator
from glm_jax.losses import token_loss
from glm_jax.model import GLM, abstract_params, init_params
from glm_jax.objectives import ObjectiveConfig, SequenceBuilder
from glm_jax.optim import OptimConfig
from glm_jax.peft import PeftConfig, combine
from glm_jax.train import Trainer

BATCH, SEQ = 8, 64
MULTIHOST_LAYERS = 4  # the two-process test's model (2 layers a stage on 2x2x2)
LR = 1e-3  # train_losses' learning rate; optim() holds it constant in a `train()` run


def config(num_layers=8, **kw):
    return get_config("glm-tiny", **{"dtype": "float32", "num_layers": num_layers, "vocab_size": 512, **kw})


def params(c):
    return init_params(c, jax.random.key(0))


def builder():
    corpus = np.random.default_rng(5).integers(10, 500, 50_000).astype(np.int32)

    def window(rng, n):
        start = int(rng.integers(0, len(corpus) - n + 1))
        return corpus[start : start + n]

    return SequenceBuilder(window, SEQ, 0, ObjectiveConfig(position_encoding_2d=True))


def local_rows(mesh=None):
    """The first batch: the rows this process's devices hold on `mesh` (without one: all)."""
    rows = None if mesh is None else sh.rows_held(sh.batch_sharding(mesh), BATCH)
    it = DataIterator(builder(), BATCH, prefetch=0, rows=rows)
    return {k: v for k, v in next(it).items() if k != "kind"}


def sharded_loss_and_grads(mesh, batch, c=None, microbatches=None, bubble_value=0.0, with_logits=False, schedule=None):
    """Loss, gradients (plain stacked layout, fully replicated numpy-ready) [and logits] on `mesh`.
    schedule None: the logits of `pipeline.forward` and their loss; "gpipe" / "1f1b": the training
    losses of those schedules (head and loss per microbatch on the last stage, no logits)."""
    c = c or config()
    plan = pipeline.PipelinePlan(c.num_layers, sh.axis_size(mesh, "stage"))
    microbatches = pipeline.microbatch_count(microbatches, BATCH, mesh)
    sh.check_splittable(c, mesh, BATCH, microbatches)
    rules = sh.rules_for(c, mesh)
    shardings = sh.named_shardings(abstract_params(c), mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    place = jax.jit(lambda p: pipeline.params_to_slots(p, plan), out_shardings=shardings)

    def loss_fn(p, b):
        if schedule == "gpipe":
            loss_sum, tokens = pipeline.gpipe_loss(p, b, c, plan, microbatches, bubble_value=bubble_value)
            return loss_sum / tokens, None
        logits = pipeline.forward(p, b, c, plan, microbatches, bubble_value=bubble_value)
        return token_loss(logits, b)[0], logits

    def step(p, b):
        if schedule == "1f1b":
            grads, loss_sum, tokens = pipeline.one_f_one_b(
                p,
                {},
                lambda trainable, frozen: combine(trainable, frozen, PeftConfig("full")),
                b,
                microbatches,
                c,
                plan,
                microbatches,
                bubble_value=bubble_value,
            )
            return loss_sum / tokens, pipeline.params_from_slots(grads, plan), None
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
        return loss, pipeline.params_from_slots(grads, plan), logits

    raw = params(c)  # outside the mesh: init would constrain the unpadded layer axis to `stage`
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        p = place(raw)
        loss, grads, logits = jax.jit(step, out_shardings=replicated)(p, batch)
    return (loss, grads, logits) if with_logits else (loss, grads)


def single_device(c=None):
    """Reference: the plain model on one device, no mesh."""
    c = c or config()
    batch = {k: jnp.asarray(v) for k, v in local_rows().items()}

    def loss_fn(p):
        logits = GLM(c).apply({"params": p}, batch)
        return token_loss(logits, batch)[0], logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params(c))
    return loss, grads, logits


def optim():
    """AdamW at a constant learning rate LR: what `train_losses` steps with."""
    return OptimConfig(peak_lr=LR, init_lr=LR, min_lr_ratio=1.0)


def train_losses(mesh, steps=3, c=None):
    """Losses of `steps` training steps (AdamW) on `mesh`, each process feeding its rows: those of
    `train.train` with optim() and seed 0 on this builder, batch and mesh."""
    c = c or config()
    trainer = Trainer(c, optim(), mesh, BATCH)
    state = trainer.init_state(0)
    data = DataIterator(builder(), BATCH, prefetch=0, rows=sh.rows_held(trainer.batch_sharding, BATCH))
    losses = []
    with trainer.context():
        for _ in range(steps):
            state, metrics = trainer.fused_step(
                state, trainer.place_batch(next(data)), jnp.float32(LR), jnp.float32(c.embedding_shrink_alpha)
            )
            losses.append(float(jax.device_get(metrics["loss"])))
    return losses
