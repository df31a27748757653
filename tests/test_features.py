"""`wsi-dala features`: a foundation model's tile features stored once per slide (features.zarr), on the real
CMU-1 crop, with small networks of the presets' families (--encoder-option) so the suite stays fast: the
stored embeddings are the encoder's by its own rule, the store resumes after a kill, refuses another
encoder's store, and an archive isolates a bad slide. About 40 s."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

from tests.test_cli_commands import WSI_DALA, ok, refused
from wsi_dala.core.config import TilingConfig
from wsi_dala.core.errors import OutputError
from wsi_dala.inference import features as features_module
from wsi_dala.inference.features import read_embeddings, write_features
from wsi_dala.model.foundation import create_encoder
from wsi_dala.model.foundation_presets import PRESETS
from wsi_dala.runs.features import FeatureSettings, features_for_slide, prepare_encoder
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.tiler import tile_slide

pytest.importorskip("timm")

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"
SMALL = {"depth": 2, "embed_dim": 48, "num_heads": 2}
SMALL_FLAGS = [f"--encoder-option={k}={v}" for k, v in SMALL.items()]


def _features(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WSI_DALA, "features", *map(str, args)], capture_output=True, text=True, timeout=600)


def test_features_of_a_real_slide_are_the_encoders_by_its_own_rule(tmp_path):
    out = tmp_path / "out"
    args = [CMU, "--arch", "virchow2", "--weights", "none", "--out", out, "--precision", "fp32", "--patch-tokens", "-q"]
    first = ok(_features(*args, *SMALL_FLAGS))
    assert "features: cmu_small_region.svs:" in first.stdout and "x 96 (" in first.stdout  # CLS ‖ mean, 2 x 48
    store = TileStore(out / "tiles.zarr")
    embeddings, coords, attrs = read_embeddings(out / "features.zarr")
    n = store.info.n_tiles
    assert n > 20 and embeddings.shape == (n, 96) and embeddings.dtype == np.float16
    np.testing.assert_array_equal(coords, store.coords())
    assert attrs["complete"] and attrs["tiling"]["tile_size_px"] == 224
    assert attrs["tiling"]["effective_mpp"] == pytest.approx(0.5, rel=0.05)
    assert attrs["encoder"]["preset"] == "virchow2" and attrs["encoder"]["options"] == SMALL
    # The same network (random weights from seed 0) on the stored tiles, by Virchow2's rule: CLS ‖ mean of the
    # patch tokens after the 4 registers.
    torch.manual_seed(0)
    encoder = create_encoder(PRESETS["virchow2"], SMALL).eval()
    tiles = torch.from_numpy(store.tiles(slice(0, 8))).permute(0, 3, 1, 2)
    mean, std = torch.tensor(PRESETS["virchow2"].mean), torch.tensor(PRESETS["virchow2"].std)
    x = (tiles.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.inference_mode():
        tokens = encoder.forward_features(x)
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1).numpy()
    np.testing.assert_allclose(embeddings[:8].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    stored_tokens = zarr.open_group(out / "features.zarr")["patch_tokens"]
    assert stored_tokens.shape == (n, 256, 48)
    np.testing.assert_allclose(stored_tokens[:8].astype(np.float32), tokens[:, 5:].numpy(), rtol=2e-3, atol=2e-3)
    again = ok(_features(*args, *SMALL_FLAGS))
    assert "(already complete)" in again.stdout


def test_a_killed_features_run_resumes_the_chunks_not_done_and_refuses_another_encoders_store(tmp_path, monkeypatch):
    tiled = tile_slide(CMU, tmp_path / "slide", TilingConfig(mpp=0.5, tile_size_px=224, chunk_tiles=16), progress=False)
    settings = FeatureSettings("uni", "none", SMALL, precision="fp32")
    encoder = prepare_encoder(settings)
    reference = write_features(tiled.store, tmp_path / "ref.zarr", encoder.network, encoder.preset, encoder.card)
    assert reference.chunks_computed == 4
    calls = {"n": 0}
    real_embed = features_module.embed

    def embed_then_die(preset, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed in the third chunk
        return real_embed(preset, tokens)

    monkeypatch.setattr(features_module, "embed", embed_then_die)
    target = tmp_path / "features.zarr"
    with pytest.raises(KeyboardInterrupt):
        write_features(tiled.store, target, encoder.network, encoder.preset, encoder.card, batch_size=16)
    group = zarr.open_group(target)
    assert list(group["chunks_done"][:]) == [True, True, False, False] and group.attrs["complete"] is False
    with pytest.raises(OutputError, match="unfinished features store"):
        read_embeddings(target)
    monkeypatch.setattr(features_module, "embed", real_embed)
    resumed = write_features(tiled.store, target, encoder.network, encoder.preset, encoder.card, batch_size=16)
    assert resumed.chunks_computed == 2
    np.testing.assert_array_equal(read_embeddings(target)[0], read_embeddings(tmp_path / "ref.zarr")[0])
    other = prepare_encoder(FeatureSettings("phikon-v2", "none", _small_dinov2(), precision="fp32"))
    with pytest.raises(OutputError, match="features of another encoder or other tiles \\(uni"):
        write_features(tiled.store, target, other.network, other.preset, other.card)


def _small_dinov2() -> dict[str, int]:
    pytest.importorskip("transformers")
    return {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}


def test_bad_input_is_one_line_and_a_misfit_is_refused_before_any_slide_is_read(tmp_path):
    missing = _features(tmp_path / "missing.svs", "--arch", "uni", "--out", tmp_path / "o", "--weights", "none")
    refused(missing, "missing.svs")
    refused(_features(CMU, "--arch", "uni3", "--out", tmp_path / "o"), "invalid choice: 'uni3'")
    wrong = tmp_path / "wrong.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in create_encoder(PRESETS["uni"], SMALL).state_dict().items()}, wrong)
    result = _features(CMU, "--arch", "uni", "--out", tmp_path / "o", "--weights", wrong)  # the full-size network
    refused(result, "wrong.safetensors: not the weights of uni (MahmoodLab/UNI")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(wrong.read_bytes()[: wrong.stat().st_size // 2])
    refused(_features(CMU, "--arch", "uni", "--out", tmp_path / "o", "--weights", truncated), "truncated.safetensors")
    pickle = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(1), "payload": _RunsCode()}, pickle)  # a pickle that would run code
    refused(_features(CMU, "--arch", "uni", "--out", tmp_path / "o", "--weights", pickle), "not a weights-only")
    assert not (tmp_path / "o").exists()


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_an_archive_goes_on_past_a_bad_slide_and_says_which(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(CMU, archive / "good.svs")
    (archive / "broken.svs").write_text("not a slide")
    result = _features(archive, "--arch", "uni", "--weights", "none", "--out", tmp_path / "out", "-q", *SMALL_FLAGS)
    assert result.returncode == 1, result.stderr
    assert "failed:   " in result.stdout and "broken.svs: not a readable" in result.stdout
    assert "1 of 2 slides failed" in result.stdout
    (folder,) = (tmp_path / "out").glob("good-*")  # a folder per slide: its name and a hash of its path
    assert read_embeddings(folder / "features.zarr")[0].shape[1] == 48


def _count_encoder_passes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """From now on, every forward pass of a timm ViT encoder is counted in the returned ``["n"]``."""
    import timm.models.vision_transformer as vit

    passes = {"n": 0}
    real_forward = vit.VisionTransformer.forward_features

    def counted(self, x):
        passes["n"] += 1
        return real_forward(self, x)

    monkeypatch.setattr(vit.VisionTransformer, "forward_features", counted)
    return passes


def _head(encoder: torch.nn.Module, seed: int, path: Path, options: dict) -> Path:
    """A checkpoint of a UNI-family head on ``encoder`` (its weights unchanged), a head drawn from ``seed``."""
    from wsi_dala.model import ModelCard, save_checkpoint
    from wsi_dala.model.encoder import EncoderClassifier

    model = EncoderClassifier(encoder, 2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator))
    card = ModelCard("uni", ["Non-tumor", "Tumor"], "Tumor", tile_size_px=224, mpp=0.5, options=options)
    return save_checkpoint(path, model, card)


def test_a_head_on_stored_patch_tokens_scores_the_slide_with_no_encoder_pass(tmp_path, monkeypatch):
    from wsi_dala.core.config import PipelineConfig, ScoringConfig
    from wsi_dala.runs.pipeline import run_slide

    out = tmp_path / "slide"
    settings = FeatureSettings("uni", "none", SMALL, patch_tokens=True, precision="fp32")
    encoder = prepare_encoder(settings)
    assert features_for_slide(CMU, out, settings, encoder, progress=False).n_tiles > 20
    heads = [_head(encoder.network, seed, tmp_path / f"head{seed}.safetensors", SMALL) for seed in (1, 2)]
    # The reference: the first head with the encoder pass (torch fp32), in a folder without stored features.
    torch_fp32 = ScoringConfig(backend="torch", precision="fp32")
    reference = run_slide(
        CMU, tmp_path / "ref", PipelineConfig(model=str(heads[0]), scoring=torch_fp32), progress=False
    )
    passes = _count_encoder_passes(monkeypatch)
    scores = []
    for head in heads:  # each head in the folder `features` wrote: scored from its patch tokens
        summary = run_slide(CMU, out, PipelineConfig(model=str(head)), progress=False)
        backend = summary.record.scoring["backend"]
        assert backend["engine"] == "stored features" and "no encoder pass" in backend["reason"], backend
        scores.append(zarr.open_group(out / "tiles.zarr", mode="r")["scores"][:, 1])
    assert passes["n"] == 0  # no encoder pass for either head
    expected = zarr.open_group(reference.layout.tiles_store, mode="r")["scores"][:, 1]
    np.testing.assert_allclose(scores[0], expected, atol=5e-3)  # tokens stored as float16
    assert np.abs(scores[1] - scores[0]).max() > 0.05  # the second head is another head
    cams = zarr.open_group(out / "tiles.zarr", mode="r")["cams"][:]
    assert cams.shape[1:] == (14, 14) and np.isfinite(cams).all()
    # Another encoder's weights: the tokens are not used, the encoder runs.
    other = create_encoder(PRESETS["uni"], {**SMALL, "img_size": 224})
    stranger = _head(other, 3, tmp_path / "stranger.safetensors", SMALL)
    summary = run_slide(CMU, out, PipelineConfig(model=str(stranger), scoring=torch_fp32), progress=False)
    assert summary.record.scoring["backend"]["engine"] == "torch" and passes["n"] > 0


def test_features_given_to_a_head_are_used_or_refused_in_one_line_before_any_output(tmp_path):
    import json

    settings = FeatureSettings("uni", "none", SMALL, patch_tokens=True, precision="fp32")
    encoder = prepare_encoder(settings)
    features_for_slide(CMU, tmp_path / "f", settings, encoder, progress=False)
    head = _head(encoder.network, 1, tmp_path / "head.safetensors", SMALL)
    run = [WSI_DALA, "run", CMU, "--model", head, "--features", tmp_path / "f", "-q", "--backend", "torch"]

    def cli(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*map(str, run), *map(str, args)], capture_output=True, text=True, timeout=600)

    ok(cli("--out", tmp_path / "used"))  # another output folder: the slide is tiled there, the tokens read here
    scoring = json.loads((tmp_path / "used" / "run.json").read_text())["scoring"]
    backend = scoring["backend"]
    assert backend["engine"] == "stored features" and backend["features_store"].endswith("f/features.zarr")
    assert scoring["chunks_scored_while_tiling"] == 0  # the encoder never ran, not even overlapped with tiling
    stranger = _head(create_encoder(PRESETS["uni"], {**SMALL, "img_size": 224}), 2, tmp_path / "s.safetensors", SMALL)
    cases = {
        "weights": (["--model", stranger], "computed with other encoder weights than this head's (--features)"),
        "tiling": (["--min-tissue", "0.6"], "computed on other tiles (another slide or tiling) (--features)"),
        "missing": (["--features", tmp_path / "nowhere"], "nowhere/features.zarr: features store not found"),
    }
    for label, (extra, phrase) in cases.items():
        refused(cli("--out", tmp_path / label, *extra), phrase)
        assert not (tmp_path / label).exists(), label


def test_train_reads_the_training_tiles_features_from_the_stores_and_runs_no_encoder(tmp_path, monkeypatch, capsys):
    from tests.test_slide_training import _write_qupath_annotations
    from wsi_dala.cli import main
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    archive = tmp_path / "slides"
    archive.mkdir()
    for seed in (11, 12):
        slide = write_synthetic_slide(
            archive / f"case{seed}.svs", SyntheticSlideSpec(width=4096, height=3072, mpp=0.25, seed=seed)
        )
        _write_qupath_annotations(slide, tmp_path / f"case{seed}.geojson")
    weights = tmp_path / "uni-small.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in create_encoder(PRESETS["uni"], SMALL).state_dict().items()}, weights)
    ok(_features(archive, "--arch", "uni", "--weights", weights, "--out", tmp_path / "features", "-q", *SMALL_FLAGS))
    passes = _count_encoder_passes(monkeypatch)
    argv = ["train", "--arch", "uni", "--weights", str(weights), *SMALL_FLAGS, "--freeze-backbone"]
    argv += ["--mpp", "0.5", "--input-size", "224", "--epochs", "2", "--batch-size", "16", "-q"]
    argv += ["--unannotated-class", "Non-tumor"]
    for seed in (11, 12):
        argv += ["--slide", f"{archive / f'case{seed}.svs'}={tmp_path / f'case{seed}.geojson'}"]
    assert main([*argv, "--out", str(tmp_path / "stored"), "--features", str(tmp_path / "features")]) == 0
    assert passes["n"] == 0  # every training and validation tile's features came from the stores
    assert main([*argv, "--out", str(tmp_path / "computed")]) == 0  # the same training, the encoder computing
    assert passes["n"] > 0
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "stored" / "best.safetensors")["head.weight"]
    computed = load_file(tmp_path / "computed" / "best.safetensors")["head.weight"]
    torch.testing.assert_close(stored, computed, atol=2e-2, rtol=0)  # float16 features against float16, tiled apart
    # The frozen encoder's features went where `features` puts them: features.zarr beside each slide's training
    # tiles, a store `features`' readers accept; a later head trained on them runs no encoder.
    beside = sorted((tmp_path / "computed" / "tiles").glob("*/features.zarr"))
    assert [p.parent.name for p in beside] == ["case11", "case12"], beside
    assert not list((tmp_path / "computed").glob("features/features-*.zarr"))  # no second, private cache
    written = zarr.open_group(beside[0], mode="r")
    assert written.attrs["complete"] and written.attrs["encoder"]["preset"] == "uni"
    from wsi_dala.model.mil_card import encoder_identity  # the same encoder, named alike by both writers

    made_by_features = zarr.open_group(next((tmp_path / "features").rglob("features.zarr")), mode="r")
    assert encoder_identity(written.attrs["encoder"]) == encoder_identity(made_by_features.attrs["encoder"])
    tiles = zarr.open_group(beside[0].parent / "tiles.zarr", mode="r")
    assert written["token_mean"].shape[0] == tiles["coords"].shape[0]
    passes["n"] = 0
    assert main([*argv, "--out", str(tmp_path / "again"), "--features", str(tmp_path / "computed" / "tiles")]) == 0
    assert main([*argv, "--out", str(tmp_path / "computed")]) == 0  # resumed: its stores are complete
    assert passes["n"] == 0
    again = load_file(tmp_path / "again" / "best.safetensors")["head.weight"]
    torch.testing.assert_close(again, computed, atol=1e-6, rtol=0)  # the very same features
    capsys.readouterr()
    other = tmp_path / "other.safetensors"
    torch.manual_seed(5)
    save_file({k: v.contiguous() for k, v in create_encoder(PRESETS["uni"], SMALL).state_dict().items()}, other)
    other_argv = [a if a != str(weights) else str(other) for a in argv]
    code = main([*other_argv, "--out", str(tmp_path / "o3"), "--features", str(tmp_path / "features")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no features store of this encoder (uni" in err[0], err


@pytest.mark.slow
def test_features_run_on_the_engine_chosen_and_a_store_begun_on_torch_is_finished_on_torch(tmp_path, monkeypatch):
    """`features --backend openvino` runs the encoder on OpenVINO (exported once, checked against torch fp32) and
    says so in the store's card; its embeddings equal torch's; the encoder is the same one to `mil`. A store
    begun on torch (an earlier release, a killed run) is finished on torch even with --backend auto."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the engine files of the run, and no other
    common = [CMU, "--arch", "uni", "--weights", "none", "--precision", "fp32", "-q", *SMALL_FLAGS]
    on_openvino = ok(_features(*common, "--out", tmp_path / "ov", "--backend", "openvino"))
    assert "openvino fp32" in on_openvino.stdout, on_openvino.stdout
    ok(_features(*common, "--out", tmp_path / "torch", "--backend", "torch"))
    ov_embeddings, _, ov_attrs = read_embeddings(tmp_path / "ov" / "features.zarr")
    torch_embeddings, _, torch_attrs = read_embeddings(tmp_path / "torch" / "features.zarr")
    assert ov_attrs["encoder"]["engine"] == "openvino" and "engine" not in torch_attrs["encoder"]
    scale = np.abs(torch_embeddings.astype(np.float32)).max()
    assert np.abs(ov_embeddings.astype(np.float32) - torch_embeddings.astype(np.float32)).max() <= 2e-3 * scale
    from wsi_dala.model.mil_card import encoder_identity

    assert encoder_identity(ov_attrs["encoder"]) == encoder_identity(torch_attrs["encoder"])
    exports = list((tmp_path / "cache" / "wsi-dala" / "encoders").rglob("uni-*-224px.onnx"))
    assert len(exports) == 1, exports  # in the user cache, named by the encoder's hash

    # Begun on torch and cut short (its second half not done): finished on torch under --backend auto.
    begun = tmp_path / "torch" / "features.zarr"
    group = zarr.open_group(begun, mode="r+")
    done = np.asarray(group["chunks_done"][:])
    done[len(done) // 2 :] = False
    group["chunks_done"][:] = done
    group.attrs["complete"] = False
    ok(_features(*common, "--out", tmp_path / "torch", "--backend", "auto"))
    resumed, _, attrs = read_embeddings(begun)
    assert "engine" not in attrs["encoder"] and attrs["complete"]
    np.testing.assert_array_equal(resumed, torch_embeddings)


def test_features_refuses_an_unknown_engine_in_one_line_through_its_console_script(tmp_path):
    done = _features(CMU, "--arch", "uni", "--weights", "none", "--out", tmp_path / "o", "--backend", "tensorrt")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and "--backend" in lines[0] and "'tensorrt'" in lines[0], lines
    assert not (tmp_path / "o").exists()
