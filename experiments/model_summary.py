"""Parameter count, per-component breakdown and bytes at fp32/bf16/int8/int4 for a preset.

    python experiments/model_summary.py --preset glm-130b [--set key=value ...]

Computed from an abstract init (`jax.eval_shape`): nothing is allocated. Ends with a one-line JSON.
"""

import argparse
import json
import sys

from glm_jax.config import PRESETS, ConfigError, config_from_args
from glm_jax.summary import parameter_summary


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.2f} {suffix}{unit}".rstrip()
        n /= 1000
    return f"{n:.2f} P{unit}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm-tiny", choices=sorted(PRESETS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = ap.parse_args(argv)
    try:
        config = config_from_args(args.preset, args.set)
    except ConfigError as e:
        ap.error(str(e))
    s = parameter_summary(config)
    print(f"{args.preset}: {s['params']:,} parameters ({_human(s['params'])})")
    print(
        f"  {config.num_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads x "
        f"{config.head_dim} ({config.num_kv_heads} kv), {config.ffn_kind} {config.inner_hidden_size}, "
        f"vocab {config.vocab_size} (padded {config.padded_vocab_size}), {config.norm_placement} {config.norm_kind}"
    )
    for name, n in s["components"].items():
        print(f"  {name:<16} {n:>18,}  {100 * n / s['params']:6.2f}%")
    for kind, b in s["bytes"].items():
        print(f"  weights at {kind:<5} {_human(b, 'B'):>10}  ({b / 2**30:,.2f} GiB)")
    summary = {
        "preset": args.preset,
        "params": s["params"],
        "components": s["components"],
        "bytes": s["bytes"],
        "overrides": args.set,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
