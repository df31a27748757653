"""Model throughput (DALAResNet50 by default): inference and training images/s at batch 32, 224 px.

    python benchmarks/model.py [--arch resvit-gannet] [--batch 32] [--size 224] [--steps 3] [--threads N]

Inference: fp32, fp32 channels_last, bf16 autocast (where the CPU has native bf16), and DT Grad-CAM
on top of a forward pass; CUDA with fp16 AMP when a GPU is present. Training: one optimiser step per
batch, fp32 and bf16/AMP.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from wsi_dala.explain.cam import logits_and_raw_cams
from wsi_dala.model import ARCHITECTURES, build_model
from wsi_dala.model.devices import cpu_supports_bf16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_inference(model, x, device, steps, autocast=None, cam=False) -> float:
    context = autocast or contextlib.nullcontext()

    def once():
        with context:
            if cam:
                logits_and_raw_cams(model, x, 1)
            else:
                with torch.no_grad():
                    model(x)

    once()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        once()
    _sync(device)
    return steps * len(x) / (time.perf_counter() - started)


def time_training(model, x, device, steps, autocast=None) -> float:
    context = autocast or contextlib.nullcontext()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    targets = torch.randint(0, 2, (len(x),), device=device)
    model.train()

    def once():
        with context:
            loss = torch.nn.functional.cross_entropy(model(x).float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    once()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        once()
    _sync(device)
    model.eval()
    return steps * len(x) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="dalaresnet50", choices=ARCHITECTURES, help="untrained, random weights")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed batches per figure (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device: {device}  threads: {torch.get_num_threads()}  batch {args.batch} x {args.size} px  "
        f"torch {torch.__version__}"
    )
    torch.manual_seed(0)
    model = build_model(args.arch, 2, "none", input_size=args.size).to(device).eval()
    print(f"{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    rows = []
    if device.type == "cuda":
        amp = torch.autocast("cuda", dtype=torch.float16)
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        rows.append(("inference fp32", time_inference(model, x, device, args.steps)))
        rows.append(("inference AMP fp16 channels_last", time_inference(model_cl, x_cl, device, args.steps, amp)))
        rows.append(("inference AMP + DT Grad-CAM", time_inference(model_cl, x_cl, device, args.steps, amp, cam=True)))
        rows.append(
            (
                "training AMP fp16",
                time_training(model_cl, x_cl, device, args.steps, torch.autocast("cuda", dtype=torch.float16)),
            )
        )
    else:
        rows.append(("inference fp32", time_inference(model, x, device, args.steps)))
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        rows.append(("inference fp32 channels_last", time_inference(model_cl, x_cl, device, args.steps)))
        if cpu_supports_bf16():
            bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
            rows.append(
                ("inference bf16 autocast channels_last", time_inference(model_cl, x_cl, device, args.steps, bf16))
            )
            rows.append(
                (
                    "inference bf16 + DT Grad-CAM",
                    time_inference(
                        model_cl, x_cl, device, args.steps, torch.autocast("cpu", dtype=torch.bfloat16), cam=True
                    ),
                )
            )
        else:
            rows.append(("inference bf16", float("nan")))
        model_train = build_model(args.arch, 2, "none", input_size=args.size).to(device)
        rows.append(("training fp32", time_training(model_train, x, device, max(1, args.steps - 1))))
        if cpu_supports_bf16():
            rows.append(
                (
                    "training bf16 autocast",
                    time_training(
                        model_train, x, device, max(1, args.steps - 1), torch.autocast("cpu", dtype=torch.bfloat16)
                    ),
                )
            )
    for name, rate in rows:
        print(f"{name:<40} {rate:8.1f} images/s")


if __name__ == "__main__":
    main()
