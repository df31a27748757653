"""Where a tile's time goes on the scoring device: read, decode, copy, model, CAM, write.

    python benchmarks/gpu.py [--slide S.svs] [--tiles 2048] [--batch 256] [--precision auto]

Reads the slide's own level-0 JPEG tiles (raw bytes with tifffile: **read**), decodes them on the CPU
(imagecodecs) and — with CUDA — on the GPU too (``torchvision.io.decode_jpeg(device="cuda")``:
**decode**), copies batches to the device (pinned memory: **copy**), runs the backbone under autocast
with channels_last (**model**), the head with its Grad-CAM gradient (**CAM**), and writes the rows into
a Zarr array (**write**). Each stage is timed on its own (``torch.cuda.synchronize`` around device
work), then scoring end to end (``score_tiles``, the function each Dask task runs, with CUDA-stream
prefetching of the next batch) gives tiles/s. Without CUDA it runs on the CPU (the GPU decode is
skipped), so the script itself is tested everywhere. Design target: ≥ 3,000 tiles/s per H100 at 224 px
with CAM. An untrained DALAResNet50 stands in without --model (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = Path(__file__).resolve().parent / ".data"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_jpeg_tiles(slide: Path, count: int) -> tuple[list[bytes], bytes, int]:
    """Up to ``count`` level-0 tiles' JPEG bytes, the shared JPEG tables, the tile side."""
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        if page.compression != 7:
            raise SystemExit(f"{slide}: level 0 is not JPEG-compressed; GPU JPEG decoding does not apply")
        tables = page.jpegtables or b""
        handle = tif.filehandle
        tiles = []
        for offset, size in zip(page.dataoffsets, page.databytecounts, strict=True):
            if size == 0:
                continue
            handle.seek(offset)
            tiles.append(handle.read(size))
            if len(tiles) >= count:
                break
        return tiles, tables, int(page.tilewidth)


def with_tables(tile: bytes, tables: bytes) -> bytes:
    """A standalone JPEG: the abbreviated tile stream with the file's shared tables spliced in."""
    if not tables:
        return tile
    return tile[:2] + tables[2:-2] + tile[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None, help="a JPEG-tiled SVS (default: a generated one)")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tiles", type=int, default=2048, help="tiles measured (default: 2048)")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default: 256; 32 on the CPU)")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    import imagecodecs
    import torch
    import zarr
    from tissue import cpu_flags

    from wsi_dala.explain.cam import head_logits_and_raw_cams
    from wsi_dala.inference.engines import BackbonePlan, load_backbone
    from wsi_dala.inference.scoring import cached_model, prepared_images, score_tiles
    from wsi_dala.model import write_untrained_checkpoint
    from wsi_dala.model.devices import resolve_device, resolve_precision

    device = resolve_device("auto")
    precision = resolve_precision(args.precision, device)
    batch_size = args.batch if device.startswith("cuda") else min(args.batch, 32)
    slide = args.slide or DATA / "synthetic_12000x9000_0.25.svs"
    if not slide.exists():
        from tiling import phase_generate

        DATA.mkdir(parents=True, exist_ok=True)
        phase_generate(slide, 12_000, 9_000)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "none"
    print(f"device {device} ({gpu}); precision {precision}; CPU {cpu_flags()}; batch {batch_size}")

    started = time.perf_counter()
    raw, tables, side = raw_jpeg_tiles(slide, args.tiles)
    read_s = time.perf_counter() - started
    n = len(raw)
    started = time.perf_counter()
    decoded = [imagecodecs.jpeg_decode(with_tables(t, tables)) for t in raw]
    cpu_decode_s = time.perf_counter() - started
    size = 224
    tiles = np.stack([d[:size, :size, :3] for d in decoded]) if side >= size else np.stack(decoded)
    rows = {"read (raw JPEG bytes)": read_s, "decode (CPU, imagecodecs)": cpu_decode_s}
    if device.startswith("cuda"):
        from torchvision.io import decode_jpeg

        data = [torch.frombuffer(bytearray(with_tables(t, tables)), dtype=torch.uint8) for t in raw]
        decode_jpeg(data[:8], device=device)  # warm-up (nvJPEG handles)
        _sync(device)
        started = time.perf_counter()
        for s in range(0, n, batch_size):
            decode_jpeg(data[s : s + batch_size], device=device)
        _sync(device)
        rows["decode (GPU, nvJPEG)"] = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = str(args.model or write_untrained_checkpoint(Path(folder) / "dala.safetensors"))
        model, card = cached_model(checkpoint, device)
        plan = BackbonePlan("torch", precision, None, torch.get_num_threads())
        backbone = load_backbone(plan, model, device)
        tiles = tiles[:, : card.tile_size_px, : card.tile_size_px]
        warm = prepared_images(tiles[:batch_size], card, device)
        head_logits_and_raw_cams(model, backbone(warm), card.positive_index)
        _sync(device)
        copy_s = model_s = cam_s = 0.0
        features = []
        for batch in (tiles[s : s + batch_size] for s in range(0, n, batch_size)):
            started = time.perf_counter()
            images = prepared_images(batch, card, device)
            _sync(device)
            copy_s += time.perf_counter() - started
            started = time.perf_counter()
            feature_map = backbone(images)
            _sync(device)
            model_s += time.perf_counter() - started
            started = time.perf_counter()
            head_logits_and_raw_cams(model, feature_map, card.positive_index)
            _sync(device)
            cam_s += time.perf_counter() - started
            features.append(feature_map.shape[-1])
        rows["copy to device (+ normalise)"] = copy_s
        rows["model (backbone)"] = model_s
        rows["CAM (head + gradient)"] = cam_s
        grid = features[0]
        packed = score_tiles(tiles, checkpoint, device, plan, batch_size)  # end to end, with prefetching
        _sync(device)
        started = time.perf_counter()
        packed = score_tiles(tiles, checkpoint, device, plan, batch_size)
        _sync(device)
        end_to_end_s = time.perf_counter() - started
        array = zarr.create_array(
            str(Path(folder) / "scores.zarr"), shape=packed.shape, chunks=(64, packed.shape[1]), dtype="float32"
        )
        started = time.perf_counter()
        for s in range(0, n, 64):
            array[s : s + 64] = packed[s : s + 64]
        rows["write (Zarr rows)"] = time.perf_counter() - started

    print(f"{n} tiles of {card.tile_size_px} px (CAM grid {grid}x{grid}), seconds and tiles/s per stage:")
    for name, seconds in rows.items():
        print(f"  {name:30s} {seconds:8.3f} s {n / max(seconds, 1e-9):10.0f} tiles/s")
    print(f"scoring end to end (score_tiles: copy, model, CAM): {n / end_to_end_s:.0f} tiles/s")


if __name__ == "__main__":
    main()
