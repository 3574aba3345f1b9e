"""Search spaces: declarative YAML -> a validated `SearchSpace` -> an Optuna define-by-run function.

    description: what the search is for
    extends: laptop.yaml   # optional: that space's base (path beside this file) under this one's
    base:          # TrainConfig values every trial shares (any TrainConfig key, nested)
      family: two_stage
      optim: {epochs: 20}
    params:        # sampled for every trial; dotted TrainConfig keys
      backbone: {type: categorical, choices: [convnext_tiny, tf_efficientnetv2_s]}
      optim.lr: {type: log_float, low: 3.0e-5, high: 3.0e-4}
      top_n: {type: int, low: 1, high: 7}
    conditional:   # sampled only for trials of that family (define-by-run)
      two_stage:
        sequence.length: {type: int, low: 4, high: 12, step: 2}
        sequence.head: lstm          # a plain value is fixed for that family
    budget:
      trials: 20
      asha: {grace_period: 2, reduction_factor: 2}   # max_t is the epochs (+1 final report)
    demo: {...}    # demo.yaml only: the generated dataset the demo runs on

Parameter types: categorical (choices), int (low, high, step, log), float (low, high, step),
log_float (low, high); any other value (a number, a list, a mapping without `type`) is fixed.
Every key is checked against TrainConfig, with its extreme values, before
a search starts, so a typo fails at once with a message naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cspine_ray.config import ConfigError, from_dict, load_yaml, overlay
from cspine_ray.train.config import TrainConfig, build_config
from cspine_ray.train.families import FAMILY_NAMES

PARAM_TYPES = ("categorical", "int", "float", "log_float")
TOP_LEVEL = ("description", "extends", "base", "params", "conditional", "budget", "demo")


@dataclass
class AshaConfig:
    grace_period: int = 2
    reduction_factor: int = 2


@dataclass
class Budget:
    trials: int = 10
    max_concurrent: int | None = None   # default: as many as the cluster's resources allow
    asha: AshaConfig | None = field(default_factory=AshaConfig)  # null disables early stopping


@dataclass
class DemoData:
    """The synthetic dataset `python -m cspine_ray.tune` generates when given no data."""

    studies: int = 24
    test_studies: int = 3
    size: int = 96
    slice_spacing: float = 3.0
    severity: str = "obvious"
    seed: int = 0
    shard_size: int = 96
    folds: int = 2


@dataclass
class SearchSpace:
    name: str
    description: str
    base: dict[str, Any]
    params: dict[str, Any]
    conditional: dict[str, dict[str, Any]]
    budget: Budget
    demo: DemoData | None

    def families(self) -> list[str]:
        """The families trials of this space can have."""
        spec = self.params.get("family")
        if is_param(spec):
            return list(spec["choices"])
        return [self.base.get("family", TrainConfig().family)]

    def fixed_and_sampled(self, family: str) -> dict[str, Any]:
        return {**self.params, **self.conditional.get(family, {})}


def is_param(spec: Any) -> bool:
    """A searched parameter is a mapping with a `type`; anything else is a fixed value."""
    return isinstance(spec, dict) and "type" in spec


def _check_param(where: str, spec: Any) -> None:
    if not is_param(spec):
        return  # a fixed value
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}: type must be one of {PARAM_TYPES}, got {kind!r}")
    allowed = {"categorical": {"type", "choices"}, "int": {"type", "low", "high", "step", "log"},
               "float": {"type", "low", "high", "step"}, "log_float": {"type", "low", "high"}}[kind]
    extra = set(spec) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} for a {kind} parameter")
    if kind == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        return
    for bound in ("low", "high"):
        if bound not in spec or isinstance(spec[bound], bool) or not isinstance(spec[bound], (int, float)):
            raise ConfigError(f"{where}: {bound} must be a number")
    if kind == "int" and not all(isinstance(spec[b], int) for b in ("low", "high")):
        raise ConfigError(f"{where}: an int parameter needs integer low and high")
    if not spec["low"] < spec["high"]:
        raise ConfigError(f"{where}: low must be < high (got {spec['low']} and {spec['high']})")
    if (kind == "log_float" or spec.get("log")) and spec["low"] <= 0:
        raise ConfigError(f"{where}: a log-scale parameter needs low > 0")


def _extremes(spec: Any) -> list[Any]:
    if not is_param(spec):
        return [spec]
    if spec["type"] == "categorical":
        return list(spec["choices"])
    return [spec["low"], spec["high"]]


def validate(space: SearchSpace, source: str) -> None:
    """Every parameter at each of its extremes must make a valid TrainConfig for its family."""
    for key, spec in space.params.items():
        _check_param(f"{source}: params.{key}", spec)
    for family, params in space.conditional.items():
        if family not in FAMILY_NAMES:
            raise ConfigError(f"{source}: conditional.{family}: not a family ({', '.join(FAMILY_NAMES)})")
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: conditional.{family} must be a mapping of parameters")
        for key, spec in params.items():
            _check_param(f"{source}: conditional.{family}.{key}", spec)
            if key == "family":
                raise ConfigError(f"{source}: conditional.{family}.family: family cannot be conditional")
    for family in space.families():
        if family not in FAMILY_NAMES:
            raise ConfigError(f"{source}: family {family!r} is not one of {', '.join(FAMILY_NAMES)}")
        params = space.fixed_and_sampled(family)
        for key, spec in params.items():  # each parameter alone, so the blame is precise
            for value in _extremes(spec):
                try:
                    build_config(space.base, {"family": family, key: value})
                except ConfigError as e:
                    where = "params" if key in space.params else f"conditional.{family}"
                    raise ConfigError(f"{source}: {where}.{key} = {value!r}: {e}") from None
        try:  # and together
            build_config(space.base, {**{k: _extremes(s)[0] for k, s in params.items()},
                                      "family": family})
        except ConfigError as e:
            raise ConfigError(f"{source}: the parameters of family {family} together: {e}") from None


def _read(path: Path) -> dict:
    data = load_yaml(path)
    unknown = set(data) - set(TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} "
                          f"(known: {', '.join(TOP_LEVEL)})")
    for section in ("base", "params", "conditional"):
        if not isinstance(data.get(section) or {}, dict):
            raise ConfigError(f"{path}: {section} must be a mapping")
    return data


def inherited_base(path: Path, data: dict, chain: tuple[Path, ...] = ()) -> dict:
    """The space's base over the base of the space it `extends` (a file beside it, and so on up
    the chain); only the base is inherited: params, conditional and budget are the space's own."""
    base = data.get("base") or {}
    parent = data.get("extends")
    if parent is None:
        return base
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends must be the file name of another search space")
    parent_path = (path.parent / parent).resolve()
    chain = (*chain, path.resolve())
    if parent_path in chain:
        raise ConfigError(f"{path}: extends {parent} makes a cycle "
                          f"({' -> '.join(p.name for p in (*chain, parent_path))})")
    if not parent_path.is_file():
        raise ConfigError(f"{path}: extends {parent}, which is not a file beside it ({parent_path})")
    return overlay(inherited_base(parent_path, _read(parent_path), chain), base)


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    data = _read(path)
    try:
        budget = from_dict(Budget, data.get("budget"), prefix="budget.")
        demo = from_dict(DemoData, data["demo"], prefix="demo.") if data.get("demo") else None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if budget.trials < 1:
        raise ConfigError(f"{path}: budget.trials must be >= 1")
    space = SearchSpace(
        name=path.stem, description=str(data.get("description", "")),
        base=inherited_base(path, data),
        params=data.get("params") or {}, conditional=data.get("conditional") or {},
        budget=budget, demo=demo,
    )
    try:
        from_dict(TrainConfig, space.base)
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None
    validate(space, str(path))
    return space


ENCODED = "json:"  # prefix of a categorical choice that is a list or mapping, as Optuna sees it


def encode_choice(value: Any) -> Any:
    """Optuna's categorical choices must be None, bool, int, float or str: a list such as
    input.windows [bone, soft] becomes the string 'json:["bone", "soft"]'."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ENCODED + json.dumps(value, sort_keys=True)


def decode_choice(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(ENCODED):
        return json.loads(value[len(ENCODED):])
    return value


def _suggest(trial, name: str, spec: Any) -> Any:
    if not is_param(spec):
        return spec
    kind = spec["type"]
    if kind == "categorical":
        return trial.suggest_categorical(name, [encode_choice(c) for c in spec["choices"]])
    if kind == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step", 1),
                                 log=spec.get("log", False))
    if kind == "float":
        return trial.suggest_float(name, spec["low"], spec["high"], step=spec.get("step"))
    return trial.suggest_float(name, spec["low"], spec["high"], log=True)


class DefineByRun:
    """The Optuna define-by-run function: shared parameters, then the family's own.

    Conditional parameters are named "<family>/<key>" in Optuna, so the same key in two
    families never shares one distribution. A class, not a closure, so Tune can checkpoint
    the searcher with it.
    """

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> dict[str, Any] | None:
        space = self.space
        values = {key: _suggest(trial, key, spec) for key, spec in space.params.items()}
        family = values.get("family", space.families()[0])
        for key, spec in space.conditional.get(family, {}).items():
            values[f"{family}/{key}"] = _suggest(trial, f"{family}/{key}", spec)
        # fixed values are not Optuna parameters: return them as the trial's constants
        specs = {**space.params,
                 **{f"{family}/{k}": v for k, v in space.conditional.get(family, {}).items()}}
        fixed = {k: v for k, v in values.items() if not is_param(specs[k])}
        return fixed or None


def trial_values(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as dotted TrainConfig keys.

    Ray unflattens "<family>/<key>" names into {"<family>": {"<key>": value}}; both forms are
    accepted and the family prefix is dropped.
    """
    values = {}
    for key, value in config.items():
        if key in FAMILY_NAMES and isinstance(value, dict):
            values.update({k: decode_choice(v) for k, v in value.items()})
        elif "/" in key and key.split("/", 1)[0] in FAMILY_NAMES:
            values[key.split("/", 1)[1]] = decode_choice(value)
        else:
            values[key] = decode_choice(value)
    return values
