"""Run a wsi-dala batch on Kubernetes with dask-kubernetes (pip install dask-kubernetes).

Needs the Dask Kubernetes operator in the cluster and an image with wsi-dala installed; the archive and
the output folder must be mounted in every worker (a PersistentVolumeClaim here).
"""

import subprocess

from dask_kubernetes.operator import KubeCluster, make_cluster_spec

spec = make_cluster_spec(
    name="wsi-dala",
    image="registry.example.org/wsi-dala:latest",
    resources={"limits": {"nvidia.com/gpu": "1", "memory": "32Gi"}, "requests": {"cpu": "8", "memory": "32Gi"}},
    n_workers=4,
)
worker = spec["spec"]["worker"]["spec"]
worker["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "slides"}}]
worker["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]

with KubeCluster(custom_cluster_spec=spec) as cluster:
    subprocess.run(
        [
            "wsi-dala",
            "batch",
            "/data/slides",
            "--out",
            "/data/wsi-dala",
            "--config",
            "/data/site.yaml",
            "--scheduler",
            cluster.scheduler_address,
        ],
        check=False,
    )
