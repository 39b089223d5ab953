"""(being written) the thudm_glm layout."""

from __future__ import annotations

from glm_jax.layout import Layout


def _unwritten(*args, **kwargs):
    raise NotImplementedError("the thudm_glm layout is being written")


LAYOUT = Layout(
    name="thudm-glm", families=("thudm-glm",), matches=lambda cfg: False, config_from=_unwritten, rules=_unwritten
)
