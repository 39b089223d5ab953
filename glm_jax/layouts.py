"""The other open models' checkpoint layouts: LLaMA, BLOOM, OPT (Hugging Face) and the original GLM
(THUDM/GLM's `modeling_glm.py`), one module each, as `released.py` (reading) and `export.py`
(writing) find them.
"""

from __future__ import annotations

from glm_jax import layout_bloom, layout_llama, layout_opt, layout_thudm_glm
from glm_jax.layout import Layout

LAYOUTS: dict[str, Layout] = {
    m.LAYOUT.name: m.LAYOUT for m in (layout_llama, layout_bloom, layout_opt, layout_thudm_glm)
}


def detect(config_json: dict) -> Layout | None:
    """The layout whose `matches` takes this config.json, or None."""
    return next((layout for layout in LAYOUTS.values() if layout.matches(config_json)), None)


def exportable() -> tuple[str, ...]:
    """The layouts `export.py` writes (`--format`)."""
    return tuple(name for name, layout in LAYOUTS.items() if layout.export is not None)
