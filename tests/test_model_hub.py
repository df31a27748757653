"""Models by name (`run --model ZOO-NAME`, `hf:ORG/REPO[@REV]`, `wsi-dala models`) through the console script,
with huggingface_hub's own client: against a fake hub on 127.0.0.1 (HF_ENDPOINT), from a cache filled by hand
with HF_HUB_OFFLINE=1, with a corrupt cache entry, and offline with nothing cached. No test touches the network."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from tests.fake_hub import FakeHub, FakeRepo, fill_cache
from tests.test_cli_commands import WSI_DALA, ok, refused
from wsi_dala.model import read_card

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REGISTRY_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
ZOO_NAME = "breast-tumor-resnet18.tiny"
REPO_ID = "test-org/breast-tumor-resnet18.tiny"
README = b"---\nlicense: cc-by-4.0\ntags:\n- pathology\n---\n# A tiny breast tumour model for tests\n"


@pytest.fixture(scope="module")
def repos():
    """The zoo registry (a dataset) and one zoo model: a traced torchvision ResNet-18 at 64 px, as the zoo's are."""
    from torchvision import models as tvm

    torch.manual_seed(4)
    network = tvm.resnet18(weights=None, num_classes=2).eval()
    script = io.BytesIO()
    torch.jit.save(torch.jit.trace(network, torch.rand(1, 3, 64, 64)), script)
    config = {
        "spec_version": "1.0",
        "architecture": "resnet18",
        "num_classes": 2,
        "class_names": ["notumor", "tumor"],
        "patch_size_pixels": 128,
        "spacing_um_px": 0.5,
        "transform": [
            {"name": "Resize", "arguments": {"size": 64}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
        ],
    }
    registry = {
        "models": {
            ZOO_NAME: {"description": "Breast tumour vs rest, for tests", "hf_repo_id": REPO_ID, "hf_revision": "main"},
            "lung-tumor-resnet34.tcga-luad": {
                "description": "Lung adenocarcinoma tumour",
                "hf_repo_id": "test-org/lung-tumor-resnet34.tcga-luad",
                "hf_revision": "main",
            },
        }
    }
    files = {"config.json": json.dumps(config).encode(), "torchscript_model.pt": script.getvalue(), "README.md": README}
    return {
        REPO_ID: FakeRepo(files, COMMIT),
        "datasets/kaczmarj/wsinfer-model-zoo-json": FakeRepo(
            {"wsinfer-zoo-registry.json": json.dumps(registry).encode()}, REGISTRY_COMMIT, frozenset()
        ),
    }


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    env.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: "offline" without HF_HUB_OFFLINE
    return env


def cli(env: dict[str, str], *args: object, timeout_s: float = 180):
    import subprocess

    return subprocess.run([WSI_DALA, *map(str, args)], capture_output=True, text=True, timeout=timeout_s, env=env)


def _fill(tmp_path: Path, repos: dict[str, FakeRepo]) -> Path:
    cache = tmp_path / "hf" / "hub"
    fill_cache(cache, "kaczmarj/wsinfer-model-zoo-json", repos["datasets/kaczmarj/wsinfer-model-zoo-json"], "dataset")
    return fill_cache(cache, REPO_ID, repos[REPO_ID])


def test_a_zoo_name_is_fetched_from_the_hub_imported_and_recorded(repos, svs_050, tmp_path):
    with FakeHub(repos) as hub:
        env = _env(tmp_path, HF_ENDPOINT=hub.endpoint)
        done = ok(cli(env, "run", svs_050.path, "--model", ZOO_NAME, "--out", tmp_path / "run", "--backend", "torch"))
        fetched = [r for r in hub.requests if r.startswith("GET")]
    assert sorted(r.rsplit("/", 1)[-1] for r in fetched) == [
        "README.md",
        "config.json",
        "torchscript_model.pt",
        "wsinfer-zoo-registry.json",
    ]
    origin = json.loads((tmp_path / "run" / "run.json").read_text())["model"]["origin"]
    assert origin["hf_repo_id"] == REPO_ID and origin["hf_revision"] == COMMIT and origin["name"] == ZOO_NAME
    assert (origin["licence"], origin["tissue"], origin["from"]) == ("cc-by-4.0", "breast", "WSInfer zoo")
    assert origin["intended_use"] == "Breast tumour vs rest, for tests"
    assert "tiles" in done.stdout
    imported = list((tmp_path / "home" / ".cache" / "wsi-dala" / "imported").glob("*.safetensors"))
    assert len(imported) == 1 and imported[0].name.startswith(ZOO_NAME)
    card = read_card(imported[0])
    assert card.training_data["origin"]["hf_revision"] == COMMIT and card.architecture == "resnet18"
    snapshot = tmp_path / "hf" / "hub" / "models--test-org--breast-tumor-resnet18.tiny" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "config.json", "torchscript_model.pt"]


def test_a_hand_filled_cache_runs_offline_and_is_listed(repos, svs_050, tmp_path):
    _fill(tmp_path, repos)
    env = _env(tmp_path, HF_HUB_OFFLINE="1")
    run = tmp_path / "run"
    ok(cli(env, "run", svs_050.path, "--model", f"hf:{REPO_ID}@{COMMIT}", "--out", run, "--backend", "torch", "-q"))
    origin = json.loads((run / "run.json").read_text())["model"]["origin"]
    assert (origin["from"], origin["hf_revision"], origin["licence"]) == ("Hugging Face", COMMIT, "cc-by-4.0")
    listed = json.loads(ok(cli(env, "models", "--json")).stdout)
    by_name = {m["name"]: m for m in listed["models"]}
    tiny, lung = by_name[ZOO_NAME], by_name["lung-tumor-resnet34.tcga-luad"]
    assert (tiny["cached"], tiny["mpp"], tiny["licence"], tiny["tissue"]) == (True, 1.0, "cc-by-4.0", "breast")
    assert (lung["cached"], lung["mpp"], lung["licence"], lung["tissue"]) == (False, None, "?", "lung")
    imported = [m for m in listed["models"] if m["group"] == "imported"]
    assert len(imported) == 1 and imported[0]["licence"] == "cc-by-4.0" and listed["problems"] == []
    table = ok(cli(env, "models")).stdout
    assert f"* {ZOO_NAME}" in table and "  lung-tumor-resnet34.tcga-luad" in table and "cc-by-4.0" in table


def test_offline_with_nothing_cached_names_the_model_and_the_folder_to_fill(repos, tmp_path, svs_050):
    cache = tmp_path / "hf" / "hub"
    fill_cache(cache, "kaczmarj/wsinfer-model-zoo-json", repos["datasets/kaczmarj/wsinfer-model-zoo-json"], "dataset")
    env = _env(tmp_path, HF_HUB_OFFLINE="1")
    out = tmp_path / "run"
    refused(cli(env, "run", svs_050.path, "--model", ZOO_NAME, "--out", out), f"{ZOO_NAME}: config.json is not in")
    line = cli(env, "run", svs_050.path, "--model", ZOO_NAME, "--out", out).stderr
    assert str(cache / "models--test-org--breast-tumor-resnet18.tiny") in line
    assert f"wsi-dala models --fetch {ZOO_NAME}" in line and not out.exists()
    no_registry = _env(tmp_path / "empty", HF_HUB_OFFLINE="1")
    refused(cli(no_registry, "run", svs_050.path, "--model", ZOO_NAME), "no such model file or folder")
    listed = ok(cli(no_registry, "models"))
    assert "warning: WSInfer zoo not listed" in listed.stdout and "datasets--kaczmarj--wsinfer-model-zoo-json" in (
        listed.stdout
    )


def test_a_corrupt_cache_entry_is_refused_offline_and_fetched_again_online(repos, tmp_path):
    snapshot = _fill(tmp_path, repos)
    blob = (snapshot / "torchscript_model.pt").resolve()
    blob.write_bytes(blob.read_bytes()[:1000])  # a download cut short
    refused(cli(_env(tmp_path, HF_HUB_OFFLINE="1"), "models", "--fetch", ZOO_NAME), "corrupt in the Hugging Face cache")
    with FakeHub(repos) as hub:
        done = ok(cli(_env(tmp_path, HF_ENDPOINT=hub.endpoint), "models", "--fetch", ZOO_NAME))
        assert f"GET /{REPO_ID}/resolve/{COMMIT}/torchscript_model.pt" in hub.requests  # at config.json's commit
    assert f"fetched {ZOO_NAME}: {REPO_ID}@{COMMIT}" in done.stdout
    assert blob.read_bytes() == repos[REPO_ID].files["torchscript_model.pt"]


def test_bad_model_names_get_one_line(repos, tmp_path, svs_050):
    with FakeHub(repos) as hub:
        env = _env(tmp_path, HF_ENDPOINT=hub.endpoint)
        refused(cli(env, "run", svs_050.path, "--model", "breast-tumor-resnet18.tin"), f"did you mean {ZOO_NAME}?")
        refused(cli(env, "models", "--fetch", f"hf:{REPO_ID}@v9"), f"{REPO_ID} has no revision 'v9'")
        refused(cli(env, "models", "--fetch", "hf:test-org/absent"), "no model test-org/absent on http://127.0.0.1")
        refused(cli(env, "models", "--fetch", "hf:../etc"), "not a Hugging Face model")
        refused(cli(env, "models", "--fetch", str(svs_050.path)), "a local path, not a model name")
