"""Models by name: WSInfer-zoo names and ``hf:ORG/REPO[@REVISION]``, fetched into the Hugging Face cache.

huggingface_hub does the fetching, caching, offline mode (``HF_HUB_OFFLINE=1``), mirrors (``HF_ENDPOINT``)
and tokens; nothing here talks HTTP. The zoo's registry (``wsinfer-zoo-registry.json`` in the dataset
``kaczmarj/wsinfer-model-zoo-json``) is read here as JSON rather than through ``wsinfer_zoo``, whose client
fetches it on import and writes ``~/.wsinfer-zoo``.

Only what a WSInfer model folder needs is fetched (``config.json``, ``torchscript_model.pt``, and the
repository's ``README.md`` for its licence), file by file with ``hf_hub_download``; the snapshot folder
then goes through the WSInfer import like any local folder, its checkpoint written to our import cache,
never into Hugging Face's snapshot. Each cached file is checked against the hash its blob is named by (the
LFS SHA-256, or git's blob SHA-1), so a truncated or altered download is caught and fetched again.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_dala.core.config import HUB_PREFIX, is_model_name
from wsi_dala.core.errors import CheckpointError
from wsi_dala.core.layout import HUB_MODEL_FILES, HUB_README, ZOO_REGISTRY_FILE

log = logging.getLogger(__name__)

ZOO_REGISTRY_REPO = "kaczmarj/wsinfer-model-zoo-json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class HubModel:
    """A model on the Hugging Face hub, as asked for: a revision is a branch, a tag or a commit."""

    repo_id: str
    revision: str = "main"
    zoo_name: str | None = None
    description: str = ""

    @property
    def label(self) -> str:
        return self.zoo_name or f"{HUB_PREFIX}{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class FetchedModel:
    """A hub model in the local cache: its WSInfer folder and where it came from (for the card and run.json)."""

    folder: Path
    origin: dict[str, Any]


def hub_reference(text: str) -> HubModel | None:
    """``hf:ORG/REPO[@REVISION]`` as a HubModel; None for anything else (a malformed one is refused)."""
    if not text.startswith(HUB_PREFIX):
        return None
    repo_id, _, revision = text[len(HUB_PREFIX) :].partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise CheckpointError(f"{text}: not a Hugging Face model (write hf:ORG/REPO or hf:ORG/REPO@REVISION)")
    return HubModel(repo_id, revision or "main")


def named_model(text: str) -> HubModel | None:
    """The hub model a ``--model`` value names (``hf:ORG/REPO[@REV]`` or a zoo name); None for a local path."""
    if text.startswith(HUB_PREFIX):
        return hub_reference(text)
    if Path(text).exists() or not is_model_name(text):
        return None
    return zoo_model(text)


def hub_cache_root() -> Path:
    """huggingface_hub's cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_cache_folder(repo_id: str, repo_type: str = "model") -> Path:
    """Where huggingface_hub keeps one repository."""
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache_root() / repo_folder_name(repo_id=repo_id, repo_type=repo_type)


def zoo_registry() -> dict[str, HubModel]:
    """The WSInfer zoo's models by name: fetched when the hub answers, else the cached copy."""
    path = download_file(
        ZOO_REGISTRY_REPO, ZOO_REGISTRY_FILE, "main", "dataset", "the zoo's registry", "`wsi-dala models`"
    )
    try:
        models = json.loads(path.read_text())["models"]
        return {
            name: HubModel(str(entry["hf_repo_id"]), str(entry["hf_revision"]), name, str(entry["description"]))
            for name, entry in models.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a WSInfer zoo registry ({type(exc).__name__}: {exc})") from exc


def zoo_model(name: str) -> HubModel:
    """A zoo name's hub model, or a one-line error with the nearest names."""
    try:
        registry = zoo_registry()
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: no such model file or folder; as a WSInfer-zoo name: {exc}") from exc
    if name in registry:
        return registry[name]
    near = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.8)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise CheckpointError(
        f"{name}: not a model file, folder or WSInfer-zoo name ({hint}`wsi-dala models` lists the {len(registry)})"
    )


def fetch(model: HubModel) -> FetchedModel:
    """The model's WSInfer folder in the Hugging Face cache (downloaded once), with its origin."""
    first, *rest = HUB_MODEL_FILES
    hint = _fetch_hint(model)
    folder = download_file(model.repo_id, first, model.revision, "model", model.label, hint).parent
    commit = folder.name  # .../models--ORG--REPO/snapshots/<commit>/config.json
    for name in rest:  # at that commit: a push between two downloads cannot mix two versions of the model
        download_file(model.repo_id, name, commit, "model", model.label, hint)
    return FetchedModel(folder, hub_origin(model, commit, _licence(model, commit)))


def hub_origin(model: HubModel, commit: str, licence: str) -> dict[str, Any]:
    return {
        "from": "WSInfer zoo" if model.zoo_name else "Hugging Face",
        "name": model.label,
        "hf_repo_id": model.repo_id,
        "hf_revision": commit,
        "revision_asked": model.revision,
        "licence": licence,
        "tissue": tissue_from_name(model.zoo_name or model.repo_id.split("/")[-1]),
        "intended_use": model.description or "see the repository's README",
    }


def tissue_from_name(name: str) -> str:
    """The zoo names models ``<tissue>-<task>-<arch>.<data>`` (breast-tumor-resnet34.tcga-brca)."""
    word = name.split("-")[0].split(".")[0].lower()
    return {"pancancer": "pan-cancer", "lymphnodes": "lymph node"}.get(word, word) or "unknown"


def _licence(model: HubModel, commit: str) -> str:
    try:
        readme = download_file(model.repo_id, HUB_README, commit, "model", model.label, _fetch_hint(model))
    except CheckpointError:
        return "unknown (no README.md model card)"
    from huggingface_hub.repocard import metadata_load

    try:
        licence = (metadata_load(readme) or {}).get("license")
    except Exception:  # a README whose front matter is not YAML: the licence is unknown, the model still usable
        licence = None
    return str(licence) if licence else "unknown (not in its README.md)"


def _fetch_hint(model: HubModel) -> str:
    return f"`wsi-dala models --fetch {model.zoo_name or HUB_PREFIX + model.repo_id + '@' + model.revision}`"


def download_file(repo_id: str, filename: str, revision: str, repo_type: str, label: str, hint: str) -> Path:
    """One file into the Hugging Face cache, checked against its blob's hash; fetched again once if corrupt."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not log.isEnabledFor(logging.DEBUG):  # it logs every retry when the hub is unreachable: our error says why
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    folder = hub_cache_folder(repo_id, repo_type)
    for force in (False, True):
        try:
            path = Path(
                hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type, force_download=force)
            )
        except GatedRepoError as exc:
            raise CheckpointError(
                f"{label}: {repo_id} is gated; accept its terms on the hub and `hf auth login`"
            ) from exc
        except RevisionNotFoundError as exc:
            raise CheckpointError(f"{label}: {repo_id} has no revision {revision!r}") from exc
        except RepositoryNotFoundError as exc:
            raise CheckpointError(f"{label}: no {repo_type} {repo_id} on {constants.ENDPOINT}") from exc
        except (
            LocalEntryNotFoundError
        ) as exc:  # (before its base class) offline (HF_HUB_OFFLINE or no connection) and not cached
            raise CheckpointError(
                f"{label}: {filename} is not in the Hugging Face cache and the hub cannot be reached; fill "
                f"{folder} ({hint} on a connected machine, then copy that folder here; HF_HUB_OFFLINE=1 skips the hub)"
            ) from exc
        except EntryNotFoundError as exc:
            raise CheckpointError(f"{label}: {repo_id}@{revision} has no {filename}") from exc
        except OSError as exc:
            raise CheckpointError(
                f"{label}: {filename} could not be fetched ({' '.join(str(exc).split())[:160]})"
            ) from exc
        if _matches_blob(path):
            return path
        if force or constants.is_offline_mode():
            raise CheckpointError(
                f"{path}: corrupt in the Hugging Face cache (its content does not match the hash it is stored "
                f"under); delete {folder} and fetch {label} again"
            )
        log.warning("%s: corrupt in the Hugging Face cache; fetching it again", path)
    raise AssertionError("unreachable")


def _matches_blob(path: Path) -> bool:
    """Hugging Face names each cached blob by its ETag: the SHA-256 of an LFS file, git's blob SHA-1 of a small
    one. A file not stored as a link into ``blobs/`` (a copied folder) cannot be checked and passes."""
    blob = path.resolve()
    name = blob.name
    if blob == path.absolute() or blob.parent.name != "blobs" or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", name):
        return True
    data = blob.read_bytes()
    if len(name) == 64:
        return hashlib.sha256(data).hexdigest() == name
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest() == name


def cached_hub_models() -> list[tuple[str, str, Path]]:
    """(repo id, commit, snapshot folder) of every WSInfer-style model in the local Hugging Face cache."""
    root = hub_cache_root()
    found = []
    for repo in sorted(root.glob("models--*")):
        repo_id = repo.name.removeprefix("models--").replace("--", "/", 1)
        for snapshot in sorted((repo / "snapshots").glob("*")):
            if all((snapshot / name).exists() for name in HUB_MODEL_FILES):
                found.append((repo_id, snapshot.name, snapshot))
    return found
