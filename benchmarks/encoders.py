"""Tiles per second and peak memory of each foundation-model preset on this machine, random weights.

    python benchmarks/encoders.py                          # every preset, 8 tiles each
    python benchmarks/encoders.py --presets uni virchow2 --tiles 16 --batch-size 8
    python benchmarks/encoders.py --presets uni phikon-v2 --engines openvino int8   # the engines of `run`

Each preset runs in a process of its own (so each peak RSS is its own): the encoder is built on the meta
device, given random weights in place (N(0, 0.02): the speed of a forward pass does not depend on them),
then its forward pass (``forward_features``, the embedding rule applied) is timed on 224 px tiles already
in memory, after one warm-up batch, in fp32 and, where the CPU has native bf16 (AVX-512 BF16 or AMX), in
bf16 under autocast. Prints the CPU flags, torch's thread count, tiles/s and peak RSS. With ``--engines``,
the network's token grid (what a preset head's scoring runs) is also exported to ONNX as `run` exports it
and timed on OpenVINO (fp32, and bf16 where the CPU has it) and, calibrated on the batch, as int8 (QDQ
through ONNX Runtime's quantiser, run by OpenVINO); each engine's largest difference from torch fp32, as a
share of the features' range, is printed beside its rate. A network over ONNX's 2 GB single-file limit
cannot be exported: the row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(name: str, tiles: int, batch_size: int, engines: list[str]) -> dict[str, float | str]:
    import torch
    from tissue import cpu_flags

    from wsi_dala.model.foundation import count_parameters, create_encoder, embed
    from wsi_dala.model.foundation_presets import PRESETS

    preset = PRESETS[name]
    started = time.perf_counter()
    with torch.device("meta"):
        encoder = create_encoder(preset)
    encoder = encoder.to_empty(device="cpu").eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.02)
    built_s = time.perf_counter() - started
    images = torch.rand(batch_size, 3, preset.input_px, preset.input_px)
    result: dict[str, float | str] = {"preset": name, "parameters": count_parameters(encoder), "build_s": built_s}
    precisions = ["fp32"] + (["bf16"] if "bf16" in cpu_flags() else [])
    for precision in precisions:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.inference_mode(), autocast:
            embed(preset, encoder.forward_features(images))  # warm-up
            done, started = 0, time.perf_counter()
            while done < tiles:
                out = embed(preset, encoder.forward_features(images))
                done += len(images)
            result[f"{precision}_tiles_s"] = done / (time.perf_counter() - started)
        assert out.shape == (batch_size, preset.embedding_dim)
    if engines:
        result.update(engine_rates(encoder, images, tiles, engines))
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def engine_rates(encoder: object, images: object, tiles: int, engines: list[str]) -> dict[str, float | str]:
    """tiles/s and the largest difference from torch fp32 of each engine, on the token grid."""
    import tempfile

    import torch
    from tissue import cpu_flags

    from wsi_dala.core.errors import EngineExportError
    from wsi_dala.inference.engines.exports import export_backbone
    from wsi_dala.inference.engines.int8 import quantise
    from wsi_dala.inference.engines.runtimes import OpenVinoBackbone
    from wsi_dala.model.encoder import EncoderClassifier

    assert isinstance(encoder, torch.nn.Module) and isinstance(images, torch.Tensor)
    model = EncoderClassifier(encoder, 2).eval()
    with torch.inference_mode():
        reference = model.forward_features(images).float()
    spread = float(reference.max() - reference.min()) or 1.0
    out: dict[str, float | str] = {}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_file = Path(tmp) / "encoder.onnx"
        try:
            export_backbone(model, images.shape[-1], fp32_file, "benchmark")
        except EngineExportError as exc:
            return {"engines": f"export failed ({str(exc)[:80]})"}
        files = {"openvino fp32": (fp32_file, "fp32")}
        if "bf16" in cpu_flags():
            files["openvino bf16"] = (fp32_file, "bf16")
        if "int8" in engines:
            int8_file = Path(tmp) / "encoder-int8.onnx"
            quantise(fp32_file, images.numpy().astype("float32"), int8_file)
            files["openvino int8"] = (int8_file, "int8")
        for label, (path, precision) in files.items():
            engine = OpenVinoBackbone(path, precision, threads, Path(tmp) / "cache")
            features = engine(images)  # warm-up, and the check
            out[f"{label} diff"] = float((features - reference).abs().max()) / spread
            done, started = 0, time.perf_counter()
            while done < tiles:
                engine(images)
                done += len(images)
            out[f"{label} tiles/s"] = done / (time.perf_counter() - started)
            del engine
    return out


def main() -> None:
    from wsi_dala.model.foundation_presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), help="presets (default: all)")
    parser.add_argument("--tiles", type=int, default=8, help="tiles timed per precision (default: 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles a forward pass (default: 4)")
    parser.add_argument(
        "--engines", nargs="*", default=[], help="also openvino (fp32, bf16) and int8 (default: torch only)"
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one preset
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tiles, args.batch_size, args.engines)))
        return

    import torch
    from tissue import cpu_flags

    print(f"{os.cpu_count()} cores, CPU {cpu_flags()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.tiles} tiles of 224 px per precision, batch {args.batch_size}, random weights\n")
    print("| preset | parameters | build s | fp32 tiles/s | bf16 tiles/s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for name in args.presets:
        command = [sys.executable, __file__, "--one", name, "--tiles", str(args.tiles)]
        command += ["--batch-size", str(args.batch_size), "--engines", *args.engines]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        bf16 = f"{r['bf16_tiles_s']:.2f}" if "bf16_tiles_s" in r else "no native bf16"
        print(
            f"| {name} | {r['parameters']:,} | {r['build_s']:.1f} | {r['fp32_tiles_s']:.2f} | {bf16} | "
            f"{r['peak_rss_gb']:.2f} GB |"
        )
        engines = {k: v for k, v in r.items() if k.startswith("openvino") or k == "engines"}
        if engines:
            rates = [k[: -len(" tiles/s")] for k in engines if k.endswith("tiles/s")]
            shown = [f"{k} {engines[k + ' tiles/s']:.2f} tiles/s (diff {engines[k + ' diff']:.2%})" for k in rates]
            print(f"|   {name}, engines | " + ("; ".join(shown) or str(engines.get("engines"))) + " |||||")


if __name__ == "__main__":
    main()
