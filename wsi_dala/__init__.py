"""wsi-dala: whole-slide tumour-probability heatmaps with DALAResNet50 and DT Grad-CAM, for QuPath."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi-dala")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
