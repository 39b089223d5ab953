"""Fine-tuned adapters on disk: saved alone (no optimizer state, no base), put back on their base.

    save_adapter(out_dir, config, peft, trainable, step, base_identity, family, tokenizer_file)
    adapter = load_adapter(out_dir)                          # OUT_DIR or OUT_DIR/adapter
    adapter = peft_files.read_adapter(dir, base_config, base_params)  # ours or a peft LoRA folder
    config, params = attach(adapter, base_config, base_params)

An adapter folder is a serving checkpoint (`checkpoints.save_serving`) of the trainable parameters
(`peft.split`: LoRA pairs, the prefix encoder, the last layers, or everything for full SFT),
whose metadata adds the method (`peft`) and the base's identity (`peft.base_identity`), checked
when it is loaded onto a base. A peft folder (`adapter_config.json` + `adapter_model.safetensors`
or `.bin`, made with Hugging Face peft on a released layout) is read by `peft_files.py` into the
same Adapter; it records no identity of its base, so only its tensors' names and shapes are
checked against the base, which reading it needs (DoRA's magnitudes are kept relative to the
base's kernel norms).
"""

from __future__ import annotations

import dataclasses
import os

from glm_jax.checkpoints import CheckpointError, move_to_device, read_checkpoint, save_serving
from glm_jax.config import GLMConfig
from glm_jax.peft import PeftConfig, combine, split

ADAPTER_DIR = "adapter"
PEFT_CONFIG_FILE = "adapter_config.json"  # what marks a Hugging Face peft folder (peft_files.py)


@dataclasses.dataclass
class Adapter:
    config: GLMConfig  # the model config it was trained with (adapter layers on)
    peft: PeftConfig
    params: dict  # the trainable parameters, plain stacked layout
    step: int
    base: dict  # peft.base_identity of the base it was trained on (a peft folder: its base_model_name_or_path)
    path: str
    peft_layout: str | None = None  # a peft folder's released layout (peft_files.LAYOUTS); None: ours


def adapter_path(path: str) -> str:
    """A fine-tuning output folder or the adapter folder itself -> the adapter folder."""
    inner = os.path.join(path, ADAPTER_DIR)
    return inner if os.path.isdir(inner) else path


def save_adapter(
    out_dir: str,
    config: GLMConfig,
    peft: PeftConfig,
    trainable: dict,
    step: int,
    base: dict,
    family: str,
    tokenizer_file: str | None,
) -> str:
    path = os.path.join(out_dir, ADAPTER_DIR)
    save_serving(
        path,
        config,
        move_to_device(dict(trainable)),
        step,
        f"finetune {peft.method}",
        family,
        tokenizer_file,
        extra={"adapter": True, "peft": peft.to_dict(), "base": base},
    )
    return path


def load_adapter(path: str) -> Adapter:
    """Our adapter folder (OUT_DIR or OUT_DIR/adapter); `peft_files.read_adapter` also takes a
    peft LoRA folder, read onto its base."""
    if os.path.isfile(os.path.join(path, PEFT_CONFIG_FILE)):
        raise CheckpointError(
            f"{path} is a peft adapter folder, read against its base: peft_files.read_adapter(path, base_config, "
            "base_params) (load_model(base, adapter=DIR) does)"
        )
    config, params, step, meta, folder = read_checkpoint(adapter_path(path))
    if not meta.get("adapter"):
        raise CheckpointError(f"{folder} is not a fine-tuned adapter (write one with `python experiments/finetune.py`)")
    return Adapter(config, PeftConfig.from_dict(meta["peft"]), params, step, meta["base"], folder)


def attach(adapter: Adapter, config: GLMConfig, params: dict) -> tuple[GLMConfig, dict]:
    """The base (float or quantized) with the adapter's parameters in place -> (config, params)."""
    model_config = adapter.peft.model_config(config)
    frozen = split(params, adapter.peft, model_config)[1]
    return model_config, combine(adapter.params, frozen, adapter.peft)
