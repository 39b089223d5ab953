"""(being written) the bloom layout."""

from __future__ import annotations

from glm_jax.layout import Layout


def _unwritten(*args, **kwargs):
    raise NotImplementedError("the bloom layout is being written")


LAYOUT = Layout(name="bloom", families=("bloom",), matches=lambda cfg: False, config_from=_unwritten, rules=_unwritten)
