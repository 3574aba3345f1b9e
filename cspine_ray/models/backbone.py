"""Backbones: any timm model as a pooled-feature extractor, failing fast and clearly offline.

`create_backbone(name)` returns `(module, num_features)`: the module maps images (B, C, H, W)
to pooled features (B, num_features). Any timm name works ("convnext_tiny" and
"tf_efficientnetv2_s" are the thesis's choices; tagged names like "convnext_tiny.fb_in22k" too).

Pretrained weights come from the Hugging Face hub (or a URL for a few old models). Without
network, the hub client retries for most of a minute before failing with a vague message, so
before asking timm for weights we check, with a short timeout, that the weight host answers.
If it does not, weights already in the local cache are used; otherwise a
`PretrainedWeightsError` says what to do. HF_HUB_OFFLINE=1 skips the check: the hub client
then reads only its cache, which is fast.
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
from timm.models import get_pretrained_cfg, parse_model_name
from torch import nn

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had (no network, not cached, none exist)."""


def create_backbone(name: str, pretrained: bool = False, in_chans: int = 3, drop_rate: float = 0.0,
                    drop_path_rate: float = 0.0, *,
                    cache_dir: str | Path | None = None) -> tuple[nn.Module, int]:
    """Build timm model `name` without its classifier: images (B, in_chans, H, W) -> (B, num_features).

    drop_rate: dropout on the pooled features; drop_path_rate: stochastic depth (both 0 = off,
    and then not passed to timm, so models without these options still build).
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
    if pretrained:
        overlay = _offline_weights(name, cache_dir)
        if overlay:
            options["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=0,
                                  cache_dir=cache_dir, **options)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise PretrainedWeightsError(
            f"cannot load pretrained weights for backbone {name!r}: {str(e).rstrip('.')}. "
            "Use pretrained=False, or fetch the weights once where there is network.") from e
    # head_hidden_size: models such as mobilenetv3 keep a projection after pooling, so their
    # output is wider than num_features.
    num_features = getattr(model, "head_hidden_size", None) or model.num_features
    return model, int(num_features)


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
                                     "use pretrained=False")
    url = huggingface_hub.constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    if _reachable(url):
        return None
    cached = _cached_weights(cfg, cache_dir)
    if cached is not None:
        log.info("weight host %s unreachable: using cached weights %s", urlparse(url).hostname, cached)
        return {"file": cached}
    raise PretrainedWeightsError(
        f"cannot load pretrained weights for backbone {name!r}: {urlparse(url).hostname} is "
        f"unreachable (no network?) and the weights are not in the local cache. Use "
        "pretrained=False, or download the weights once on a machine with network and copy the "
        "Hugging Face cache (HF_HUB_CACHE) here.")


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
