"""Run a wsi-dala batch on a SLURM cluster with dask-jobqueue (pip install dask-jobqueue).

One Dask worker per GPU job; each worker processes whole slides (the unit of work of a batch).
Adjust queue, account, resources and paths to your site, then: python pipelines/slurm/cluster.py
"""

import subprocess

from dask_jobqueue import SLURMCluster

cluster = SLURMCluster(
    queue="gpu",
    account="pathology",
    cores=8,  # CPU cores per job: tiling threads and data loading
    processes=1,  # one worker process per job ...
    memory="32GB",
    walltime="08:00:00",
    job_extra_directives=["--gres=gpu:1"],  # ... and one GPU per worker
    job_script_prologue=["source /opt/wsi-dala/.venv/bin/activate"],
    log_directory="/data/wsi-dala/logs/slurm",
)
cluster.adapt(minimum_jobs=0, maximum_jobs=8)  # grow with the queue of slides, shrink when idle

subprocess.run(
    [
        "wsi-dala",
        "batch",
        "/data/slides",
        "--out",
        "/data/wsi-dala",
        "--config",
        "/opt/wsi-dala/pipelines/site.yaml",
        "--scheduler",
        cluster.scheduler_address,
    ],
    check=False,
)
cluster.close()
