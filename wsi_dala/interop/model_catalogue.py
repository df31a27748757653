"""What ``wsi-dala models`` lists: the WSInfer zoo, hub models in the local cache, and this project's own.

Everything is read from local files (the cached registry, cached ``config.json`` and ``README.md``, model
cards); only the registry itself is refreshed when the hub answers. A model not yet fetched shows what the
registry says and ``?`` for what only its files would tell.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wsi_dala.core.config import HUB_PREFIX
from wsi_dala.core.errors import CheckpointError, WsiDalaError
from wsi_dala.core.layout import DEFAULT_DEMO_DIR, HUB_MODEL_FILES, HUB_README, IMPORT_CACHE_DIR, DemoLayout
from wsi_dala.interop.model_hub import (
    HubModel,
    cached_hub_models,
    tissue_from_name,
    zoo_registry,
)
from wsi_dala.interop.wsinfer_geometry import network_mpp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogueEntry:
    group: str  # "WSInfer zoo", "Hugging Face cache", "this project", "imported"
    name: str  # what --model takes
    tissue: str
    mpp: float | None  # µm/px of the network's input; None: not known until fetched
    licence: str
    intended_use: str
    cached: bool  # usable without the network
    where: str  # the local folder or file, or the hub repository

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Catalogue:
    entries: list[CatalogueEntry]
    problems: list[str]  # what could not be listed (no registry offline...), one line each


def catalogue(demo_dir: Path = Path(DEFAULT_DEMO_DIR)) -> Catalogue:
    entries: list[CatalogueEntry] = []
    problems: list[str] = []
    zoo_repos: set[str] = set()
    try:
        registry = zoo_registry()
    except WsiDalaError as exc:
        problems.append(f"WSInfer zoo not listed: {exc}")
        registry = {}
    for name, model in sorted(registry.items()):
        zoo_repos.add(model.repo_id)
        entries.append(_hub_entry("WSInfer zoo", name, model))
    for repo_id, commit, _ in cached_hub_models():
        if repo_id not in zoo_repos:
            entries.append(
                _hub_entry("Hugging Face cache", f"{HUB_PREFIX}{repo_id}@{commit}", HubModel(repo_id, commit))
            )
    demo = DemoLayout(demo_dir).model.best_checkpoint
    if demo.is_file():
        entries.append(
            _checkpoint_entry("this project", demo, "generated H&E", "the demo only: trained on generated slides")
        )
    imported = IMPORT_CACHE_DIR.expanduser()
    for path in sorted(imported.glob("*.safetensors")) if imported.is_dir() else []:
        entries.append(_checkpoint_entry("imported", path, None, None))
    return Catalogue(entries, problems)


def _hub_entry(group: str, name: str, model: HubModel) -> CatalogueEntry:
    from huggingface_hub import try_to_load_from_cache

    cached = [try_to_load_from_cache(model.repo_id, file, revision=model.revision) for file in HUB_MODEL_FILES]
    config_path = cached[0] if isinstance(cached[0], str) else None
    mpp = None
    if config_path is not None:
        try:
            mpp = network_mpp(json.loads(Path(config_path).read_text()), Path(config_path))
        except (ValueError, KeyError, TypeError, OSError, WsiDalaError) as exc:
            log.warning("%s: unreadable config.json (%s)", config_path, exc)
    return CatalogueEntry(
        group=group,
        name=name,
        tissue=tissue_from_name(model.zoo_name or model.repo_id.split("/")[-1]),
        mpp=mpp,
        licence=_cached_licence(model),
        intended_use=model.description or "see the repository's README",
        cached=all(isinstance(path, str) for path in cached),
        where=str(Path(config_path).parent) if config_path else f"{model.repo_id}@{model.revision}",
    )


def _cached_licence(model: HubModel) -> str:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    readme = try_to_load_from_cache(model.repo_id, HUB_README, revision=model.revision)
    if not isinstance(readme, str):
        return "?"
    try:
        licence = (metadata_load(Path(readme)) or {}).get("license")
    except Exception:  # front matter that is not YAML
        licence = None
    return str(licence) if licence else "unknown"


def _checkpoint_entry(group: str, path: Path, tissue: str | None, use: str | None) -> CatalogueEntry:
    from wsi_dala.model import read_card
    from wsi_dala.model.checkpoint import card_origin

    try:
        card = read_card(path)
    except CheckpointError as exc:
        return CatalogueEntry(group, str(path), "?", None, "?", f"unreadable: {exc}", False, str(path))
    origin = card_origin(card)
    return CatalogueEntry(
        group=group,
        name=str(path),
        tissue=tissue or str(origin.get("tissue", "unknown")),
        mpp=card.mpp,
        licence=str(origin.get("licence", "unknown")),
        intended_use=use or str(origin.get("intended_use", "unknown")),
        cached=True,
        where=str(path),
    )
