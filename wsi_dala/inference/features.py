"""A foundation model's tile features, computed once per slide and kept beside its tiles (``features.zarr``).

Labs run several heads (classifiers, slide-level models) on one encoder; the encoder is the cost (a ViT-g
runs at about one tile a second on two CPU cores), so its output is stored once. The store holds, per
tile of the slide's ``tiles.zarr`` and in its order: the pooled embedding by the model's own rule (N x D,
float16), the tile's level-0 coordinates, and with ``patch_tokens`` the last block's patch tokens (N x P x C,
float16: UNI at 224 px keeps 196 x 1024 x 2 bytes = 392 KiB a tile). Its attributes hold the tiling record
of the tile store, the encoder's card (preset, weights and their hash, where they came from, transform,
embedding rule, precision) and the hash of both, ``features_key``.

Resumable like the tile store: written chunk by chunk (the tile store's chunks), a chunk counted in
``chunks_done`` only after its rows are written, ``complete`` set last; a rerun computes only the chunks
not done. A store made by another encoder, or from other tiles, is refused by name, never mixed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from tqdm import tqdm

from wsi_dala.core.errors import OutputError
from wsi_dala.core.identity import config_hash
from wsi_dala.core.layout import building_path
from wsi_dala.model.devices import autocast, normalise
from wsi_dala.model.foundation import embed
from wsi_dala.model.foundation_presets import FoundationPreset
from wsi_dala.model.interface import as_split, pool
from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.tiling.features_store import (
    CHUNKS_DONE,
    COORDS,
    EMBEDDING,
    FEATURES_FORMAT,
    PATCH_TOKENS,
    TOKEN_MEAN,
    FeaturesStore,
)
from wsi_dala.tiling.store import TileStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturesResult:
    path: Path
    n_tiles: int
    chunks_computed: int  # in this call (0: the store was complete)
    embedding_dim: int
    seconds: float


def encoder_card(
    preset: FoundationPreset, weights: dict[str, Any], options: dict[str, Any], precision: str, embedding_dim: int
) -> dict[str, Any]:
    """What the features depend on, besides the tiles: recorded in the store and hashed into its key."""
    return {
        "preset": preset.name,
        "title": preset.title,
        "hf_repo": preset.hf_repo,
        "licence": preset.licence,
        "weights": weights,  # {"file", "sha256"} and, from the hub, {"hf_revision"}; or {"weights": "none"}
        "options": options,
        "input_px": preset.input_px,
        "resize_px": preset.resize_px,
        "mean": list(preset.mean),
        "std": list(preset.std),
        "embedding": preset.embedding,
        "embedding_dim": embedding_dim,
        "precision": precision,
    }


def features_key(card: dict[str, Any], tiling_key: str) -> str:
    return config_hash({"encoder": card, "tiles": tiling_key, "format": FEATURES_FORMAT})


def checkpoint_encoder_card(
    architecture: str,
    weights: dict[str, Any],
    tile_size_px: int,
    mean: list[float],
    std: list[float],
    width: int,
    precision: str,
) -> dict[str, Any]:
    """The encoder card of a wsi-dala classifier used as an encoder (``features --model``): its backbone's
    feature map averaged over space."""
    return {
        "preset": None,
        "architecture": architecture,
        "weights": weights,
        "options": {},
        "input_px": tile_size_px,
        "resize_px": tile_size_px,
        "mean": list(mean),
        "std": list(std),
        "embedding": "the backbone's last feature map, averaged over space",
        "embedding_dim": width,
        "precision": precision,
    }


def encoder_input(
    tiles: np.ndarray,
    preset: FoundationPreset | None,
    card: dict[str, Any],
    device: torch.device | str = "cpu",
    stain: StainNormaliser | None = None,
) -> torch.Tensor:
    """uint8 tiles [N, H, W, 3] as the encoder takes them: stain-mapped when asked, then the preset's
    transform, or for a classifier's backbone the centre ``input_px`` crop, normalised."""
    images = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).to(device)
    if stain is not None:  # train --stain-normalise: the training set's stain mapped to the reference first
        images = stain(images)
    if preset is None:
        return normalise(_centre_crop(images, int(card["input_px"])), card["mean"], card["std"])
    return model_input(images, preset, card["mean"], card["std"])


def _encode_tiles(
    encoder: torch.nn.Module,
    preset: FoundationPreset | None,
    card: dict[str, Any],
    tiles: np.ndarray,
    device: torch.device,
    stain: StainNormaliser | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(embedding, patch-token mean, patch tokens or None) of one batch of uint8 tiles, on the CPU.
    ``forward``: the engine that runs ``encoder.forward_features`` (OpenVINO, ONNX Runtime); None: torch."""
    x = encoder_input(tiles, preset, card, device, stain)
    if forward is None:
        with torch.inference_mode(), autocast(card["precision"], device):
            out = as_split(encoder).forward_features(x).float().cpu()
    else:
        out = forward(x).float().cpu()
    if preset is None:  # a classifier's backbone: its pooled map is both the embedding and the token mean
        pooled = pool(out)
        return pooled, pooled, None
    registers = int(getattr(encoder, "num_prefix_tokens", 1)) - 1
    patches = out[:, 1 + registers :]
    return embed(preset, out), patches.mean(dim=1), patches


def _centre_crop(images: torch.Tensor, size_px: int) -> torch.Tensor:
    """The central ``size_px`` square of [N, C, H, W] images (what training's validation transform shows)."""
    top, left = max(0, (images.shape[-2] - size_px) // 2), max(0, (images.shape[-1] - size_px) // 2)
    return images[..., top : top + size_px, left : left + size_px]


def model_input(images: torch.Tensor, preset: FoundationPreset, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 images [N, 3, H, W] as the model's transform makes them: resized (where its transform resizes
    first, e.g. Prov-GigaPath's 256), centre-cropped to its input, normalised."""
    x = normalise(images, mean, std)
    if x.shape[-1] != preset.resize_px or x.shape[-2] != preset.resize_px:
        x = F.interpolate(x, size=(preset.resize_px, preset.resize_px), mode="bicubic", antialias=True)
    top = (x.shape[-2] - preset.input_px) // 2
    left = (x.shape[-1] - preset.input_px) // 2
    return x[..., top : top + preset.input_px, left : left + preset.input_px]


@dataclass(frozen=True)
class EncoderEngine:
    """The engine ``features`` runs an encoder on, and the card its stores record."""

    card: dict[str, Any]  # the encoder card, with ``engine`` when it is not torch, and the engine's precision
    forward: Callable[[torch.Tensor], torch.Tensor] | None  # None: torch, as write_features runs it itself
    label: str  # e.g. "openvino bf16"
    reason: str  # measured fastest | asked | fallback: ...
    rates_tiles_per_s: dict[str, float]


def plan_encoder_engine(
    encoder: torch.nn.Module,
    preset: FoundationPreset | None,
    card: dict[str, Any],
    sample: np.ndarray,
    backend: str,
    anchor: Path,
    sha256: str,
) -> EncoderEngine:
    """The engine an encoder runs on (``features --backend``), chosen as ``run`` chooses a backbone's
    (``inference.engines.plan``): ``auto`` exports the encoder to ONNX once (files named by ``sha256`` in
    ``anchor``'s engine folder), checks each installed engine that offers the card's precision against torch
    fp32 on ``sample`` (uint8 tiles of the first slide: an fp32 engine off by more than 1e-3 of the features'
    range is not used), measures their speed once per CPU, and takes the fastest. An export that fails (a
    network ONNX cannot express) falls back to torch, logged."""
    from wsi_dala.inference.engines.plan import BackboneRequest, plan_backbone
    from wsi_dala.inference.engines.runtimes import load_backbone

    x = encoder_input(sample, preset, card)
    request = BackboneRequest(
        checkpoint=str(anchor),
        sha256=sha256,
        model=encoder,
        tile_px=int(x.shape[-1]),
        device="cpu",
        backend=backend,
        precision=str(card["precision"]),
        sample=x,
    )
    choice = plan_backbone(request)
    plan = choice.plan
    if plan.engine == "torch":  # the card as before: stores made by earlier releases keep their key
        forward, chosen = None, {**card, "precision": plan.precision}
    else:
        forward = load_backbone(plan, encoder, "cpu")
        chosen = {**card, "engine": plan.engine, "precision": plan.precision}
    return EncoderEngine(chosen, forward, plan.label, choice.reason, dict(choice.rates_tiles_per_s))


def write_features(
    tiles_store: Path,
    features_store: Path,
    encoder: torch.nn.Module,
    preset: FoundationPreset | None,
    card: dict[str, Any],
    batch_size: int = 8,
    patch_tokens: bool = False,
    progress: bool = True,
    device: torch.device | str = "cpu",
    stain: StainNormaliser | None = None,
    replace_other: bool = False,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FeaturesResult:
    """Compute (or finish) the features of every tile of ``tiles_store`` into ``features_store``.

    ``stain``: map each tile's stain first (its description must be in ``card``, so the key tells such
    features apart). ``replace_other``: a store of another encoder or other tiles at ``features_store`` is
    replaced (a training's own tiles folder), not refused (a folder the user named). ``forward``: the
    engine running the encoder (``plan_encoder_engine``; its name and precision must be in ``card``)."""
    import time

    started = time.perf_counter()
    store = TileStore(tiles_store)
    info = store.info
    if not info.complete:
        raise OutputError(f"{tiles_store}: the tiles are not complete; tile the slide first")
    key = features_key(card, info.tiling.tiling_key)
    patch_tokens = patch_tokens and preset is not None  # a CNN's map is not tokens
    group = _open_or_create(features_store, key, store, card, preset, encoder, patch_tokens, replace_other)
    device = torch.device(device)
    done = np.asarray(_array(group, CHUNKS_DONE)[:], dtype=bool)
    todo = [i for i in range(info.n_chunks) if not done[i]]
    bar = tqdm(total=len(todo), unit="chunk", desc="features", disable=not progress, leave=False)
    encoder.eval()
    for index in todo:
        rows = slice(index * info.chunk_tiles, min(info.n_tiles, (index + 1) * info.chunk_tiles))
        tiles = store.tiles(rows)
        pooled, means, tokens = [], [], []
        for start in range(0, len(tiles), batch_size):
            batch = tiles[start : start + batch_size]
            embedding, token_mean, patches = _encode_tiles(encoder, preset, card, batch, device, stain, forward)
            pooled.append(embedding.numpy().astype(np.float16))
            means.append(token_mean.numpy().astype(np.float16))  # what a preset's linear head pools
            if patch_tokens and patches is not None:
                tokens.append(patches.numpy().astype(np.float16))
        _array(group, EMBEDDING)[rows] = np.concatenate(pooled)
        _array(group, TOKEN_MEAN)[rows] = np.concatenate(means)
        if patch_tokens:
            _array(group, PATCH_TOKENS)[rows] = np.concatenate(tokens)
        done[index] = True
        _array(group, CHUNKS_DONE)[:] = done  # after the rows: a killed run redoes this chunk, never skips it
        bar.update(1)
    bar.close()
    group.attrs["complete"] = True
    seconds = time.perf_counter() - started
    return FeaturesResult(features_store, info.n_tiles, len(todo), int(card["embedding_dim"]), seconds)


def _open_or_create(
    path: Path,
    key: str,
    store: TileStore,
    card: dict[str, Any],
    preset: FoundationPreset | None,
    encoder: torch.nn.Module,
    patch_tokens: bool,
    replace_other: bool = False,
) -> zarr.Group:
    info = store.info
    if path.exists():
        try:
            return _existing(path, key, patch_tokens)
        except OutputError as refused:
            if not replace_other:
                raise
            log.info("%s; computing them again", refused)  # a training's own tiles folder: its own cache
            shutil.rmtree(path)
    n, chunk = info.n_tiles, max(1, info.chunk_tiles)
    building = building_path(path)  # made under a hidden name, renamed when its layout and attributes are written
    if building.exists():
        shutil.rmtree(building)
    group = zarr.open_group(building, mode="w", zarr_format=3)
    width = int(card["embedding_dim"])
    group.create_array(EMBEDDING, shape=(n, width), chunks=(chunk, width), dtype="float16")
    width_tokens = width if preset is None else int(getattr(encoder, "num_features", preset.embed_dim))
    group.create_array(TOKEN_MEAN, shape=(n, width_tokens), chunks=(chunk, width_tokens), dtype="float16")
    group.create_array(COORDS, data=store.coords(), chunks=(max(1, n), 2))
    group.create_array(CHUNKS_DONE, data=np.zeros(info.n_chunks, dtype=bool), chunks=(max(1, info.n_chunks),))
    if patch_tokens and preset is not None:
        grid = (preset.input_px // _patch_px(encoder, preset)) ** 2
        group.create_array(
            PATCH_TOKENS, shape=(n, grid, width_tokens), chunks=(chunk, grid, width_tokens), dtype="float16"
        )
    group.attrs.update(
        {
            "format": FEATURES_FORMAT,
            "features_key": key,
            "encoder": card,
            "tiling": info.tiling.to_attrs(),
            "tiles_store": str(store.path),
            "tiles_key": info.tiling.tiling_key,  # which tiles the rows are: run compares its own store's
            "patch_tokens": patch_tokens,
            "complete": False,
        }
    )
    building.rename(path)
    return zarr.open_group(path, mode="r+")


def _existing(path: Path, key: str, patch_tokens: bool) -> zarr.Group:
    """The store at ``path`` to complete, when it holds these features; else OutputError saying what it holds."""
    try:
        group = zarr.open_group(path, mode="r+")
        previous = dict(group.attrs)
    except Exception as exc:  # damaged: never guessed at
        raise OutputError(f"{path}: not a readable features store ({exc}); delete it to compute it again") from exc
    if previous.get("features_key") != key:
        made_by = previous.get("encoder")
        was = (made_by.get("preset") or made_by.get("architecture", "unknown")) if isinstance(made_by, dict) else "?"
        raise OutputError(
            f"{path}: features of another encoder or other tiles ({was}, key {previous.get('features_key')}); "
            "choose another --out or delete it"
        )
    if patch_tokens and PATCH_TOKENS not in group:
        raise OutputError(f"{path}: computed without --patch-tokens; delete it to compute them")
    return group


def _array(group: zarr.Group, name: str) -> zarr.Array:
    array = group[name]
    if not isinstance(array, zarr.Array):
        raise OutputError(f"{group.store}: {name} is not an array")
    return array


def _patch_px(encoder: torch.nn.Module, preset: FoundationPreset) -> int:
    size = getattr(getattr(encoder, "patch_embed", None), "patch_size", preset.patch_px)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(embeddings [N, D] float16, level-0 coordinates [N, 2], attributes) of a complete store."""
    store = FeaturesStore.open(path)
    return store.array(EMBEDDING), store.array(COORDS), store.attrs
