"""Archive batch throughput: a LocalCluster of 2 worker processes vs 1, slides/hour and worker memory.

    python benchmarks/batch.py [--slides 6] [--size 8192x6144]

Generates an archive of synthetic slides once (benchmarks/.data/archive), then runs `wsi-dala batch`
through a dask.distributed LocalCluster with 1 and with 2 workers (1 thread each), printing slides/hour
and each worker's RSS at the start and at the end of the batch (memory must stay flat across slides).
The model is an untrained DALAResNet50 (224 px at 0.5 µm/px): speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / ".data"


def worker_rss_mb(client) -> list[float]:
    import psutil

    return sorted(round(v / 2**20) for v in client.run(lambda: psutil.Process().memory_info().rss).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--size", default="8192x6144", help="WIDTHxHEIGHT of each slide at 0.25 µm/px")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from wsi_dala.core.config import BatchConfig, PipelineConfig
    from wsi_dala.model import write_untrained_checkpoint
    from wsi_dala.runs.archive import run_batch
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    width, height = (int(v) for v in args.size.split("x"))
    archive = DATA / f"archive_{args.slides}x{args.size}"
    for i in range(args.slides):
        path = archive / f"site{i % 2}" / f"slide{i:03d}.svs"
        if not path.exists():
            write_synthetic_slide(path, SyntheticSlideSpec(width=width, height=height, mpp=0.25, seed=100 + i))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_untrained_checkpoint(Path(tmp) / "dala.safetensors")
        config = PipelineConfig(model=str(checkpoint))
        for workers in (1, 2):
            # The cores are shared out between workers: torch in each uses cores / workers threads.
            threads = str(max(1, (os.cpu_count() or 2) // workers))
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                env={"OMP_NUM_THREADS": threads},
            )
            with cluster, Client(cluster) as client:
                cold = worker_rss_mb(client)
                # Warm every worker with one slide each, so "start" is a loaded model, not an empty process.
                warm = BatchConfig(scheduler=cluster.scheduler_address, pattern="slide00[01].svs")
                run_batch(archive, Path(tmp) / f"warm{workers}", config, warm, progress=False)
                before = worker_rss_mb(client)
                started = time.perf_counter()
                result = run_batch(
                    archive,
                    Path(tmp) / f"out{workers}",
                    config,
                    BatchConfig(scheduler=cluster.scheduler_address),
                    progress=False,
                )
                seconds = time.perf_counter() - started
                after = worker_rss_mb(client)
            tiles = sum(o.tiles for o in result.outcomes)
            print(
                f"{workers} worker(s): {len(result.outcomes)} slides ({tiles} tiles) in {seconds:.1f} s = "
                f"{3600 * len(result.outcomes) / seconds:.0f} slides/hour; {result.counts()}; "
                f"worker RSS MB: empty {cold}, after a warm-up slide {before}, at the end {after}"
            )


if __name__ == "__main__":
    main()
