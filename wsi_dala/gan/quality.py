"""How close generated tiles are to real ones: KID (Bińkowski et al. 2018), computed by torch-fidelity.

KID needs a feature space. torch-fidelity's own is InceptionV3 (ImageNet photographs), fetched from
GitHub on first use; here nothing is downloaded, so ``--kid-inception FILE`` takes that file from disk
(`weights-inception-2015-12-05-6726825d.pth`), read first with ``torch.load(weights_only=True)``: a file
that is not plain tensors is refused before torch-fidelity (which loads it with pickle) sees it. The
alternative, and the default in the benchmark, is the feature space of a `wsi-dala pretrain` backbone
(``--kid-encoder FILE``): histology features learned from the archive's own tiles. The MMD estimate
itself is torch-fidelity's (``kid_features_to_metric``: polynomial kernel of degree 3, 100 subsets).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from wsi_dala.core.errors import CheckpointError, ConfigError
from wsi_dala.core.extras import require
from wsi_dala.model import build_model
from wsi_dala.model.devices import normalise
from wsi_dala.model.interface import pooled_features
from wsi_dala.model.normalisation import IMAGENET_MEAN, IMAGENET_STD
from wsi_dala.model.weights import pretrain_card

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
Features = Callable[[torch.Tensor], torch.Tensor]  # uint8 tiles [N, 3, H, W] -> features [N, D]


def encoder_features(path: Path) -> tuple[Features, str]:
    """Pooled features of a `wsi-dala pretrain` backbone, and a name for the card."""
    card = pretrain_card(path)
    if card is None:
        raise CheckpointError(f"{path}: not a `wsi-dala pretrain` backbone (no pre-training card)")
    model = build_model(card["architecture"], 2, str(path), card.get("options") or {}, card["tile_size_px"]).eval()

    def features(tiles: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pooled_features(model, normalise(tiles, list(IMAGENET_MEAN), list(IMAGENET_STD))).float()

    return features, f"{card['architecture']} pre-trained by {card['method']} ({path.name})"


def inception_features(path: Path) -> tuple[Features, str]:
    """torch-fidelity's InceptionV3 pool features (2048), from a local weights file."""
    if not path.is_file():
        raise ConfigError(
            f"{path}: InceptionV3 weights not found; put torch-fidelity's {INCEPTION_FILE} (from its GitHub "
            "releases) there, or measure KID with --kid-encoder BACKBONE.safetensors instead"
        )
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # anything but plain tensors is refused, never run
        raise CheckpointError(f"{path}: not a weights-only torch file ({' '.join(str(exc).split())[:160]})") from exc
    inception = require("torch_fidelity.feature_extractor_inceptionv3", "KID of generated tiles (gan train)")
    network = inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )

    def features(tiles: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(tiles.to(torch.uint8))[0].float()

    return features, "InceptionV3 pool (torch-fidelity)"


def batched(features: Features, tiles: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([features(tiles[i : i + batch]) for i in range(0, len(tiles), batch)])


def kid(real: torch.Tensor, generated: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """KID mean and SD over subsets (torch-fidelity's estimator) between two feature sets [N, D]."""
    metric = require("torch_fidelity.metric_kid", "KID of generated tiles (gan train)")
    KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD = metric.KEY_METRIC_KID_MEAN, metric.KEY_METRIC_KID_STD
    kid_features_to_metric = metric.kid_features_to_metric

    size = min(1000, len(real), len(generated))
    result = kid_features_to_metric(
        real.double(), generated.double(), kid_subsets=100, kid_subset_size=size, verbose=False, rng_seed=seed
    )
    return float(result[KEY_METRIC_KID_MEAN]), float(result[KEY_METRIC_KID_STD])
