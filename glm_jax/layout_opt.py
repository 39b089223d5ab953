"""(being written) the opt layout."""

from __future__ import annotations

from glm_jax.layout import Layout


def _unwritten(*args, **kwargs):
    raise NotImplementedError("the opt layout is being written")


LAYOUT = Layout(name="opt", families=("opt",), matches=lambda cfg: False, config_from=_unwritten, rules=_unwritten)
