"""The generic registry: unknown names and duplicates are refused with the field and the choices."""

import pytest

from morec_dist.registry import Registry, RegistryError


def test_lookup_names_and_errors():
    r: Registry[int] = Registry("model", "model.name")
    r.register("mf", 1)
    r.decorator("two_tower")(2)
    assert r.names() == ["mf", "two_tower"] and r.get("mf") == 1 and "two_tower" in r and len(r) == 2
    with pytest.raises(
        RegistryError, match=r"model\.name: unknown model 'nope'; expected one of \['mf', 'two_tower'\]"
    ):
        r.get("nope")
    with pytest.raises(RegistryError, match="already registered"):
        r.register("mf", 3)
    r.register("mf", 3, replace=True)
    assert r.get("mf") == 3
