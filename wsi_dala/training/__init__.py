"""Training and evaluation: data sources, patient/slide-level splits, the training loop, metrics."""
