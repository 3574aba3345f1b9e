"""One registry of named models and the factory that builds them (timm style).

A model class registers itself with `@register_model("name")`; callers build it with
`create_model("name", **kwargs)`, where kwargs usually come straight from a YAML mapping.
The factory checks the keys against the constructor's signature, so a typo in a config
fails here with the key named instead of deep inside a constructor.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable, TypeVar

from torch import nn

from cspine_ray.config import ConfigError

M = TypeVar("M", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make `create_model(name, ...)` build this class."""

    def add(builder: M) -> M:
        if name in _MODELS and _MODELS[name] is not builder:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name]!r}")
        _MODELS[name] = builder
        return builder

    return add


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def _accepted_arguments(builder: Callable[..., nn.Module]) -> list[str] | None:
    """Keyword names the builder takes, or None when it takes **kwargs (anything goes)."""
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name` with keyword arguments `kwargs`.

    Raises ValueError for an unknown name (listing the known ones) and `ConfigError`
    (a ValueError) for an argument the model does not take (naming it).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    builder = _MODELS[name]
    accepted = _accepted_arguments(builder)
    if accepted is not None:
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"model {name!r}: unknown argument {key!r}{hint}; "
                                  f"accepted: {', '.join(accepted)}")
    return builder(**kwargs)
