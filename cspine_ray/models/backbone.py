"""Backbones: any timm model as a pooled-feature extractor, failing fast and clearly offline.

`create_backbone(name)` returns `(module, num_features)`: the module maps images (B, C, H, W)
to pooled features (B, num_features). Any timm name works ("convnext_tiny" and
"tf_efficientnetv2_s" are the thesis's choices; tagged names like "convnext_tiny.fb_in22k" too).

Inputs are CT windows scaled to [0, 1]. Every backbone, pretrained or not, first applies
(x - mean) / std with its timm pretrained config's mean and std (ImageNet's without one), tiled
over the windows of a 3k-channel input: pretrained weights see what they were trained on, and
one input convention serves all models. The module is the timm model itself, normalising in a
forward pre-hook with non-persistent buffers, so state-dict keys ("backbone.conv_stem.weight")
are those of the bare timm model and fold checkpoints load strictly.

Pretrained weights come from `weights`, a local file (.safetensors, .pth, .bin, .pt) or a folder
holding `<backbone name>.safetensors` (or .pth, .bin, .pt); timm adapts the first conv to
in_chans. Without `weights` they come from the Hugging Face hub (or a URL for a few old
models). Without network, the hub client retries for most of a minute before failing with a
vague message, so before asking timm for weights we check, with a short timeout, that the
weight host answers. If it does not, weights already in the local cache are used; otherwise a
`PretrainedWeightsError` says where to put them. HF_HUB_OFFLINE=1 skips the check: the hub
client then reads only its cache, which is fast.
"""

from __future__ import annotations

import difflib
import logging
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg, load_state_dict, parse_model_name
from torch import nn

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
WHERE_WEIGHTS_GO = ("Give a local copy with --weights FILE_OR_FOLDER (or the `weights:` config "
                    "key): a weights file, or a folder holding <backbone name>.safetensors; or "
                    "copy a Hugging Face cache holding them here (HF_HUB_CACHE); or use "
                    "pretrained=False.")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had (no network, not cached, none exist,
    or a local file that does not fit the backbone)."""


def create_backbone(name: str, pretrained: bool = False, in_chans: int = 3, drop_rate: float = 0.0,
                    drop_path_rate: float = 0.0, *, weights: str | Path | None = None,
                    cache_dir: str | Path | None = None) -> tuple[nn.Module, int]:
    """Build timm model `name` without its classifier: images (B, in_chans, H, W) -> (B, num_features).

    drop_rate: dropout on the pooled features; drop_path_rate: stochastic depth (both 0 = off,
    and then not passed to timm, so models without these options still build).
    weights: a local weights file or folder (see `_weights_file`); implies pretrained.
    cache_dir: where pretrained weights are cached (default: the Hugging Face cache).
    """
    _check_name(name)
    if in_chans < 1:
        raise ValueError(f"in_chans must be at least 1, got {in_chans}")
    options = {}
    if drop_rate:
        options["drop_rate"] = drop_rate
    if drop_path_rate:
        options["drop_path_rate"] = drop_path_rate
    file = _weights_file(name, weights) if weights else None
    if file:
        pretrained = True
        options["pretrained_cfg_overlay"] = {"file": file}
    elif pretrained:
        overlay = _offline_weights(name, cache_dir)
        if overlay:
            options["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=0,
                                  cache_dir=cache_dir, **options)
    except (OSError, RuntimeError, SafetensorError) as e:
        if not pretrained:
            raise
        source = f" from {file}" if file else ""
        hint = "" if file else f" {WHERE_WEIGHTS_GO}"
        raise PretrainedWeightsError(f"cannot load pretrained weights for backbone {name!r}"
                                     f"{source}: {str(e).rstrip('.')}.{hint}") from e
    if file:
        _check_weights_fit(model, name, file)
    _normalize_inputs(model, in_chans)
    # head_hidden_size: models such as mobilenetv3 keep a projection after pooling, so their
    # output is wider than num_features.
    num_features = getattr(model, "head_hidden_size", None) or model.num_features
    return model, int(num_features)


def _weights_file(name: str, weights: str | Path) -> str:
    """The file of pretrained weights for backbone `name`: `weights` itself, or in folder
    `weights` the file named after the backbone (or its architecture, for a tagged name such as
    "convnext_tiny.fb_in22k"), so one folder serves backbones that differ between stages."""
    if parse_model_name(name)[0] is not None:  # timm would load from the hub, ignoring the file
        raise ValueError(f"weights= needs a timm model name, not {name!r}")
    path = Path(weights).expanduser()
    if path.is_dir():
        stems = dict.fromkeys([name, name.split(".")[0]])
        candidates = [path / f"{stem}{suffix}" for stem in stems for suffix in WEIGHT_SUFFIXES]
        for candidate in candidates:
            if candidate.is_file():
                return str(candidate)
        raise PretrainedWeightsError(f"no weights for backbone {name!r} in folder {path}: looked "
                                     f"for {', '.join(c.name for c in candidates)}")
    if path.suffix not in WEIGHT_SUFFIXES or not path.is_file():
        raise PretrainedWeightsError(f"weights for backbone {name!r}: {path} is no folder and no "
                                     f"{'/'.join(WEIGHT_SUFFIXES)} file")
    return str(path)


def _check_weights_fit(model: nn.Module, name: str, file: str) -> None:
    """Refuse a file that lacks some of the model's parameters. timm loads non-strictly once the
    classifier is dropped (num_classes=0), so another architecture's weights would otherwise
    leave a silently random model. Reads the file as timm does (safetensors, or torch.load with
    weights_only=True)."""
    names = set(load_state_dict(file))
    missing = [key for key, _ in model.named_parameters() if key not in names]
    if missing:
        raise PretrainedWeightsError(
            f"weights {file} do not fit backbone {name!r}: {len(missing)} of its parameters are "
            f"not in the file (e.g. {', '.join(missing[:3])}); it needs timm's weights of this "
            "architecture")


def _normalize_inputs(model: nn.Module, in_chans: int) -> None:
    """Make `model` apply (x - mean) / std with its pretrained config's statistics first.

    Window-major channels (w0: z-1, z, z+1, w1: ...) get the 3 values tiled per window; any
    other channel count gets their average. Buffers are non-persistent (not in state dicts)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean") or IMAGENET_DEFAULT_MEAN, dtype=torch.float32)
    std = torch.tensor(cfg.get("std") or IMAGENET_DEFAULT_STD, dtype=torch.float32)
    if in_chans % len(mean):
        mean, std = mean.mean().repeat(in_chans), std.mean().repeat(in_chans)
    else:
        mean, std = mean.repeat(in_chans // len(mean)), std.repeat(in_chans // len(std))
    model.register_buffer("input_mean", mean.reshape(1, in_chans, 1, 1), persistent=False)
    model.register_buffer("input_std", std.reshape(1, in_chans, 1, 1), persistent=False)
    model.register_forward_pre_hook(_normalize)


def _normalize(model: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook (a module-level function, so models still pickle and deepcopy)."""
    image, *rest = args
    return ((image - model.input_mean) / model.input_std, *rest)


def _check_name(name: str) -> None:
    source, architecture = parse_model_name(name)
    if source is not None:  # "hf-hub:org/repo" or "local-dir:path": timm resolves it itself
        return
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture.split(".")[0], timm.list_models(), n=5)
        hint = f"; did you mean one of: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm backbone {name!r}{hint} (see timm.list_models())")


def _offline_weights(name: str, cache_dir: str | Path | None) -> dict | None:
    """None when timm may fetch the weights itself; {"file": path} for cached weights offline.

    Raises PretrainedWeightsError when the host is unreachable and nothing is cached.
    """
    if parse_model_name(name)[0] is not None or huggingface_hub.constants.is_offline_mode():
        return None
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise PretrainedWeightsError(f"timm knows no pretrained weights for backbone {name!r}; "
                                     "give them with --weights FILE_OR_FOLDER, or use "
                                     "pretrained=False")
    url = huggingface_hub.constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    if _reachable(url):
        return None
    cached = _cached_weights(cfg, cache_dir)
    if cached is not None:
        log.info("weight host %s unreachable: using cached weights %s", urlparse(url).hostname, cached)
        return {"file": cached}
    raise PretrainedWeightsError(
        f"cannot load pretrained weights for backbone {name!r}: {urlparse(url).hostname} is "
        f"unreachable (no network?) and the weights are not in the local cache. "
        f"{WHERE_WEIGHTS_GO}")


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the server behind `url` answers at all (any HTTP status counts); honours proxies."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, timeouts and refused connections are OSErrors
        return False
    return True


def _cached_weights(cfg, cache_dir: str | Path | None) -> str | None:
    """Path of the weights for pretrained config `cfg` in the local cache, if they are there."""
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        # timm prefers safetensors and falls back to the pickled checkpoint
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename
                         else ["model.safetensors", "pytorch_model.bin"]):
            path = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir,
                                                          revision=revision or None)
            if isinstance(path, str):
                return path
        return None
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / Path(urlparse(cfg.url).path).name
    return str(path) if path.is_file() else None
