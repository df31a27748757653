"""DALAResNet50, its attention module, the baselines, pretrained weights and checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from wsi_dala.core.errors import CheckpointError
from wsi_dala.model import (
    ARCHITECTURES,
    DalaOptions,
    DALAResNet50,
    ModelCard,
    build_model,
    load_checkpoint,
    read_card,
    save_checkpoint,
)
from wsi_dala.model.attention import GateAttention
from wsi_dala.model.registry import FOUNDATION_PRESETS, REGISTRY, architecture
from wsi_dala.model.weights import OFFLINE_ENV


def test_shapes_and_parameter_counts():
    model = DALAResNet50(num_classes=2).eval()
    attention = sum(p.numel() for p in model.attention.parameters())
    assert attention == 2 * 2048 * 256 + 256 + 2048  # 1x1 2048->256 and 256->2048 with biases: ~1.05 M
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 2048 * 512 + 512 + 512 * 256 + 256 + 256 * 2 + 2
    resnet50_without_fc = 25_557_032 - (2048 * 1000 + 1000)
    assert sum(p.numel() for p in model.parameters()) == resnet50_without_fc + attention + head
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 2048, 7, 7)
        assert model(x).shape == (2, 2)
    blocks = DALAResNet50(4, DalaOptions(attention_position="blocks"))
    assert len(blocks.attention) == 3
    with torch.no_grad():
        assert blocks.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_head_is_dual_activated():
    head = DALAResNet50(3).head
    assert isinstance(head.act1, torch.nn.LeakyReLU) and head.act1.negative_slope == 0.01
    assert isinstance(head.act2, torch.nn.ReLU)
    assert (head.fc1.out_features, head.fc2.out_features, head.fc3.out_features) == (512, 256, 3)


@pytest.mark.parametrize("gate_mode", ["x*a", "x*(1+a)"])
def test_attention_gates_as_specified(gate_mode):
    torch.manual_seed(0)
    module = GateAttention(64, reduction=8, gate_mode=gate_mode)
    x = torch.randn(2, 64, 5, 5)
    a = torch.sigmoid(module.expand(torch.relu(module.reduce(x))))
    expected = x * a if gate_mode == "x*a" else x * (1 + a)
    torch.testing.assert_close(module(x), expected)
    assert a.shape == x.shape  # per position and per channel
    assert module.reduce.out_channels == 8


@pytest.mark.parametrize("kind", ["se", "eca", "cbam-spatial"])
def test_other_attention_kinds_build_and_run(kind):
    model = DALAResNet50(2, DalaOptions(attention_kind=kind)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_every_architecture_builds_as_its_registry_entry_says():
    """The registry's torch-free facts (what the CLI, settings and docs read) agree with the built networks.
    The foundation models (ViT-L to ViT-g, 0.3-1.1 billion weights) are built and run on the meta device:
    shapes without weights, 3 s instead of 70 (their forward passes with weights are in test_foundation)."""
    for arch in ARCHITECTURES:
        entry = REGISTRY[arch]
        device = torch.device("meta" if arch in FOUNDATION_PRESETS else "cpu")
        with device:
            if arch == "colour-reference":  # the reference scorer has two classes by definition
                with pytest.raises(ValueError, match="two classes"):
                    build_model(arch, num_classes=3)
                model = build_model(arch, num_classes=2).eval()
            else:
                model = build_model(arch, num_classes=3, pretrained="none").eval()
            with torch.no_grad():
                features = model.forward_features(torch.randn(1, 3, 224, 224))
                assert model.forward_head(features).shape == (1, 3 if arch != "colour-reference" else 2), arch
        assert model.spatial_features == entry.spatial_features, arch
        assert features.shape[1 if entry.spatial_features else 2] == entry.feature_dim, (arch, features.shape)
        probe = getattr(model, "linear_probe_encoder", lambda: None)()
        assert (probe is not None) == entry.linear_probe, arch
    assert [a for a in ARCHITECTURES if not REGISTRY[a].spatial_features] == ["vit_b_16", "dinov2_vitb14"]


def test_an_unknown_architecture_names_the_choices():
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet9000': must be one of dalaresnet50, "):
        build_model("resnet9000")
    assert architecture("timm:vit_tiny_patch16_224").loads_own_weights


def test_imagenet_offline_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(CheckpointError, match=r"resnet50-11ad3fa6\.pth.*checkpoints"):
        build_model("dalaresnet50", 2, pretrained="imagenet")


def test_imagenet_from_torch_cache_loads_backbone(monkeypatch, tmp_path):
    """With the file where torchvision's weights API caches it, no download is tried."""
    from torchvision.models import resnet50

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = resnet50(weights=None)
    target = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    monkeypatch.setattr(
        "torchvision.models._api.WeightsEnum.get_state_dict",
        lambda self, *a, **k: torch.load(target, weights_only=True),
    )
    model = build_model("dalaresnet50", 2, pretrained="imagenet")
    torch.testing.assert_close(model.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)


def test_pretrained_path_loads_matching_tensors(tmp_path):
    from torchvision.models import resnet50

    reference = resnet50(weights=None)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = build_model("dalaresnet50", 2, pretrained=str(path))
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)
    with pytest.raises(CheckpointError, match="not found"):
        build_model("dalaresnet50", 2, pretrained=str(tmp_path / "missing.safetensors"))


def _card(**changes) -> ModelCard:
    fields = dict(
        architecture="dalaresnet50",
        class_names=["benign", "malignant"],
        positive_class="malignant",
        tile_size_px=224,
        mpp=0.5,
        mpp_note="test",
        options={"gate_mode": "x*(1+a)"},
        training_data={"source": "test", "counts_train": {"benign": 3, "malignant": 5}},
        validation_metrics={"balanced_accuracy": 0.9},
    )
    fields.update(changes)
    return ModelCard(**fields)


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    model = build_model("dalaresnet50", 2, options={"gate_mode": "x*(1+a)"}).eval()
    card = _card()
    path = save_checkpoint(tmp_path / "model.safetensors", model, card)
    loaded, loaded_card = load_checkpoint(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded_card.to_json() == card.to_json()
    assert read_card(path).positive_index == 1
    assert loaded.options.gate_mode == "x*(1+a)"


def test_pickle_checkpoints_are_refused(tmp_path):
    model = build_model("dalaresnet50", 2)
    torch_file = tmp_path / "model.pt"
    torch.save(model.state_dict(), torch_file)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(torch_file)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(disguised)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(CheckpointError, match="model card"):
        load_checkpoint(bare)
    # A real safetensors file whose header length happens to begin with a pickle marker (0x80 0x04):
    # its JSON header follows at byte 8, so it is not refused as a pickle.
    lookalike = tmp_path / "lookalike.safetensors"
    for padding in range(2000):
        save_file({"x": torch.zeros(1)}, str(lookalike), metadata={"pad": "p" * padding})
        if lookalike.read_bytes()[:2] == b"\x80\x04":
            break
    assert lookalike.read_bytes()[:2] == b"\x80\x04"
    with pytest.raises(CheckpointError, match="model card"):  # read as safetensors, found without a card
        load_checkpoint(lookalike)


def test_card_is_validated():
    with pytest.raises(CheckpointError, match="positive class"):
        _card(positive_class="tumour").validate()
    with pytest.raises(CheckpointError, match="implausible"):
        _card(mpp=1e6).validate()


def test_the_worked_example_of_adding_an_architecture_builds(monkeypatch):
    """docs/architecture.md: one module with a builder and one registry entry make an architecture."""
    import wsi_dala.model.registry as registry
    from docs.examples.efficientnet import ENTRY

    monkeypatch.setitem(registry.REGISTRY, ENTRY.name, ENTRY)
    model = build_model(ENTRY.name, num_classes=2, pretrained="none").eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 224, 224))
    assert features.shape[1] == ENTRY.feature_dim and model.spatial_features == ENTRY.spatial_features
    assert (model.linear_probe_encoder() is not None) == ENTRY.linear_probe
    assert model.forward_head(features).shape == (1, 2)
