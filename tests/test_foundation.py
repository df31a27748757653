"""Foundation models by name (``--arch uni``...): each preset built on the meta device (no memory, no weights)
matches the facts its source states; small networks of the same families run forward and DT Grad-CAM; weights
load strictly; ``--weights hub`` fetches from the model's repository (a fake hub on 127.0.0.1) and offline
says which file to put where. About 25 s (transformers' import and seven meta-device builds)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.fake_hub import FakeHub, FakeRepo
from tests.images import write_blob_folder
from tests.test_cli_commands import WSI_DALA, ok, refused
from tests.test_model_hub import _env
from wsi_dala.cli import main
from wsi_dala.core.errors import CheckpointError
from wsi_dala.explain.cam import logits_and_raw_cams
from wsi_dala.model import build_model
from wsi_dala.model.foundation import Dinov2Tokens, check_weights, count_parameters, create_encoder, embed
from wsi_dala.model.foundation_presets import PRESETS

pytest.importorskip("timm")

# What each source states, written out here independently of the preset table. Columns: token width, depth,
# heads, patch px, register tokens, MLP kind, embedding width, parameters of the network built (timm 1.0.31,
# num_classes=0, img_size=224), and the count its source states, with how that source rounds it.
STATED = {
    # UNI README_old.md ("shape [1,1024]", vit_large_patch16_224); ViT-L/16. Count: "303.4M", third party
    # (rendeirolab/lazyslide-models): the model card gives none.
    "uni": (1024, 24, 16, 16, 0, "gelu", 1024, 303_350_784, (303.4e6, 0.05e6)),
    # UNI README.md: ViT-h/14-reg8, depth 24, 24 heads, 1536, SwiGLU, reg_tokens 8, "shape [1, 1536]". Count
    # "681.4M", third party (lazyslide-models): the card gives none.
    "uni2-h": (1536, 24, 24, 14, 8, "swiglu", 1536, 681_394_176, (681.4e6, 0.05e6)),
    # huggingface.co/paige-ai/Virchow2: ViT-H/14, 4 registers, SwiGLU, CLS ‖ mean of patch tokens = 2560.
    # arXiv 2408.00738: "a 632 million parameter vision transformer" — the network has 631.2M; the paper's
    # figure is the nominal ViT-H/14 size, so it is checked to within 0.2 %.
    "virchow2": (1280, 32, 16, 14, 4, "swiglu", 2560, 631_239_424, (632e6, 0.002 * 632e6)),
    # huggingface.co/bioptimus/H-optimus-0: "a 1.1B parameter vision transformer" (rounded to 0.1B);
    # bioptimus/releases: g/14, 4 registers, 40 blocks, 24 heads, 1536.
    "h-optimus-0": (1536, 40, 24, 14, 4, "swiglu", 1536, 1_134_774_272, (1.1e9, 0.05e9)),
    # Bioptimus' launch note: "a 1.1 billion parameter vision transformer" (rounded); same network as v0.
    "h-optimus-1": (1536, 40, 24, 14, 4, "swiglu", 1536, 1_134_774_272, (1.1e9, 0.05e9)),
    # prov-gigapath config.json (as copied by TRIDENT and slide2vec): patch 16, 1536, depth 40, 24 heads.
    # Count "1.13B", third party (lazyslide-models; bio.rodeo "~1.13 billion").
    "prov-gigapath": (1536, 40, 24, 16, 0, "swiglu", 1536, 1_134_953_984, (1.13e9, 0.005e9)),
    # huggingface.co/owkin/phikon-v2: ViT-L/16 through DINOv2, CLS token. Count "303.4M", third party
    # (lazyslide-models); includes Dinov2Model's 1,024-value mask token.
    "phikon-v2": (1024, 24, 16, 16, 0, "gelu", 1024, 303_351_808, (303.4e6, 0.05e6)),
}


def _facts(encoder: torch.nn.Module) -> tuple[int, int, int, int, int, str]:
    if isinstance(encoder, Dinov2Tokens):
        config = encoder.model.config
        mlp = "swiglu" if config.use_swiglu_ffn else "gelu"
        return config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size, 0, mlp
    from timm.layers import GluMlp, Mlp

    block = encoder.blocks[0]
    glu = isinstance(block.mlp, GluMlp) and isinstance(block.mlp.act, torch.nn.SiLU)  # SwiGLUPacked
    mlp = "swiglu" if glu else "gelu" if type(block.mlp) is Mlp and isinstance(block.mlp.act, torch.nn.GELU) else "?"
    registers = encoder.num_prefix_tokens - (1 if encoder.cls_token is not None else 0)
    patch = encoder.patch_embed.patch_size[0]
    return encoder.embed_dim, len(encoder.blocks), block.attn.num_heads, patch, registers, mlp


@pytest.mark.parametrize("name", sorted(STATED))
def test_each_preset_matches_the_architecture_its_source_states(name):
    if PRESETS[name].library == "transformers":
        pytest.importorskip("transformers")
    width, depth, heads, patch, registers, mlp, embedding_dim, parameters, (stated, within) = STATED[name]
    with torch.device("meta"):
        encoder = create_encoder(PRESETS[name])
        tokens = encoder.forward_features(torch.empty(2, 3, 224, 224))
    assert _facts(encoder) == (width, depth, heads, patch, registers, mlp)
    count = count_parameters(encoder)
    assert count == parameters == PRESETS[name].parameters
    assert abs(count - stated) <= within, f"{name}: {count:,} parameters against the stated {stated:,.0f}"
    grid = (224 // patch) ** 2
    assert tokens.shape == (2, 1 + registers + grid, width)
    assert embed(PRESETS[name], tokens).shape == (2, embedding_dim)


def test_the_presets_are_the_registry_names_the_cli_offers():
    from wsi_dala.model.registry import FOUNDATION_PRESETS, REGISTRY

    assert set(FOUNDATION_PRESETS) == set(STATED) <= set(REGISTRY)
    assert all(REGISTRY[name].linear_probe and REGISTRY[name].loads_own_weights for name in STATED)


SMALL = {"depth": 2, "embed_dim": 48, "num_heads": 2}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("uni", SMALL),
        ("virchow2", SMALL),
        ("h-optimus-0", SMALL),
        ("phikon-v2", {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}),
    ],
)
def test_small_networks_of_each_family_give_the_exact_grad_cam_on_their_token_grid(name, options):
    if PRESETS[name].library == "transformers":
        pytest.importorskip("transformers")
    patch = PRESETS[name].patch_px
    size = 4 * patch
    torch.manual_seed(0)
    model = build_model(name, 2, "none", options, input_size=size).eval()
    images = torch.rand(3, 3, size, size)
    features = model.forward_features(images)
    assert features.shape == (3, 48, 4, 4)
    logits, raw = logits_and_raw_cams(model, images, positive_index=1)
    torch.testing.assert_close(logits, model(images))
    head = model.head.weight.detach()
    cam = torch.relu(torch.einsum("c,nchw->nhw", head[1], features.detach()) / 16)
    torch.testing.assert_close(raw, cam, rtol=1e-4, atol=1e-6)


def _small_uni(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_encoder(PRESETS["uni"], {**SMALL, "img_size": 64})


def test_weights_load_strictly_and_a_misfit_is_refused_by_name(tmp_path):
    source = _small_uni(1)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    good = tmp_path / "uni.safetensors"
    save_file(state, good)
    model = build_model("uni", 2, str(good), SMALL, input_size=64).eval()
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(model.encoder.forward_features(images), source.eval().forward_features(images))
    wrapped = tmp_path / "wrapped.bin"  # a torch file, read with weights_only, its "module." prefix stripped
    torch.save({f"module.{k}": v for k, v in state.items()}, wrapped)
    build_model("uni", 2, str(wrapped), SMALL, input_size=64)
    cases = {
        "extra": ({**state, "head.weight": torch.zeros(2, 48)}, "1 not of this network (e.g. ['head.weight'])"),
        "missing": ({k: v for k, v in state.items() if not k.endswith("ls1.gamma")}, "2 missing"),
        "shape": ({**state, "cls_token": torch.zeros(1, 1, 32)}, "cls_token (1, 1, 32), not (1, 1, 48)"),
    }
    for label, (tensors, phrase) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(tensors, path)
        with pytest.raises(CheckpointError, match="not the weights of uni") as caught:
            check_weights(PRESETS["uni"], {**SMALL, "img_size": 64}, path)
        assert phrase in str(caught.value), str(caught.value)
        with pytest.raises(CheckpointError, match="not the weights of uni"):
            build_model("uni", 2, str(path), SMALL, input_size=64)


def test_a_misspelt_preset_is_one_line_with_the_name_meant(capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:  # argparse's own exit
        main(["train", "--folder", str(tmp_path), "--out", str(tmp_path / "o"), "--arch", "virchow-2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and "'virchow-2' must be one of" in err[0], err
    assert "timm network; did you mean 'virchow2'?" in err[0], err


def test_a_misfit_file_is_refused_by_train_before_any_data_is_read(capsys, tmp_path):
    wrong = tmp_path / "uni.safetensors"
    save_file({k: v.contiguous() for k, v in _small_uni().state_dict().items()}, wrong)  # small, not UNI's size
    data = write_blob_folder(tmp_path / "data", size=32, n=8, groups=4)
    code = main(
        ["train", "--folder", str(data), "--out", str(tmp_path / "o"), "--arch", "uni", "--weights", str(wrong)]
    )
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "uni.safetensors: not the weights of uni (MahmoodLab/UNI" in err[0] and "of another shape" in err[0]
    assert "training on" not in captured.out and not (tmp_path / "o").exists()


def test_weights_hub_fetches_from_the_models_repository_and_offline_names_the_file_and_folder(tmp_path):
    """huggingface_hub's own client against a fake hub on 127.0.0.1 (HF_ENDPOINT), in new processes: it
    reads its endpoint and cache folder from the environment when imported."""
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in _small_uni().state_dict().items()}, buffer)
    commit = "c0ffee" + "0" * 34
    repo = FakeRepo({"pytorch_model.bin": buffer.getvalue()}, commit, lfs=frozenset({"pytorch_model.bin"}))
    data = write_blob_folder(tmp_path / "data", size=32, n=8, groups=4)
    fetch = (
        "import json; from wsi_dala.interop.foundation_weights import fetch_foundation_weights as f; "
        "from wsi_dala.model.foundation_presets import PRESETS; p, o = f(PRESETS['uni']); "
        "print(json.dumps({'path': str(p), **o}))"
    )
    with FakeHub({"MahmoodLab/UNI": repo}) as hub:
        env = _env(tmp_path, HF_ENDPOINT=hub.endpoint)
        fetched = json.loads(
            ok(subprocess.run([sys.executable, "-c", fetch], capture_output=True, text=True, env=env)).stdout
        )
        # train's default for a preset is --weights hub: fetched (now from the cache), then checked strictly
        train = [WSI_DALA, "train", "--folder", str(data), "--out", str(tmp_path / "o"), "--arch", "uni", "-q"]
        trained = subprocess.run(train, capture_output=True, text=True, env=env, timeout=300)
    assert fetched["hf_repo"] == "MahmoodLab/UNI" and fetched["hf_revision"] == commit
    assert Path(fetched["path"]).read_bytes() == repo.files["pytorch_model.bin"]
    assert sum(r.startswith("GET /MahmoodLab/UNI/resolve/") for r in hub.requests) == 1
    build_model("uni", 2, fetched["path"], SMALL, input_size=64)  # the fetched file loads into its network
    refused(trained, "pytorch_model.bin: not the weights of uni (MahmoodLab/UNI")  # the small file is not UNI
    assert not (tmp_path / "o").exists()

    offline = _env(tmp_path / "empty", HF_HUB_OFFLINE="1")
    train = [WSI_DALA, "train", "--folder", str(data), "--out", str(tmp_path / "o"), "--arch", "virchow2", "-q"]
    result = subprocess.run(train, capture_output=True, text=True, env=offline, timeout=300)
    refused(result, "--arch virchow2: pytorch_model.bin is not in the Hugging Face cache")
    line = result.stderr.strip()
    assert "models--paige-ai--Virchow2" in line and "hf download paige-ai/Virchow2 pytorch_model.bin" in line, line
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_of_a_preset_family_runs_on_a_real_slide_with_its_token_grid_cams(tmp_path):
    from wsi_dala.core.config import PipelineConfig, ScoringConfig
    from wsi_dala.model import ModelCard, save_checkpoint
    from wsi_dala.runs.pipeline import run_slide

    torch.manual_seed(0)
    model = build_model("h-optimus-0", 2, "none", SMALL, input_size=56).eval()
    preset = PRESETS["h-optimus-0"]
    card = ModelCard(
        architecture="h-optimus-0",
        class_names=["Non-tumor", "Tumor"],
        positive_class="Tumor",
        tile_size_px=56,
        mpp=2.0,
        options=SMALL,
        normalisation={"mean": list(preset.mean), "std": list(preset.std)},  # not ImageNet's
    )
    checkpoint = save_checkpoint(tmp_path / "h-optimus-small.safetensors", model, card)
    config = PipelineConfig(model=str(checkpoint), scoring=ScoringConfig(backend="torch", precision="fp32"))
    summary = run_slide(
        Path(__file__).parent / "data" / "cmu_small_region.svs", tmp_path / "run", config, progress=False
    )
    record = summary.record
    assert record.counts.tiles > 20 and summary.layout.tumour_geojson().exists()
    import zarr

    store = zarr.open_group(summary.layout.tiles_store, mode="r")
    cams, scores = store["cams"][:], store["scores"][:]
    assert cams.shape[1:] == (4, 4) and scores.shape == (record.counts.tiles, 2)  # 56 px / 14 px patches
    assert (cams >= 0).all() and cams.max() > 0 and abs(scores.sum(axis=1) - 1).max() < 1e-4
