"""The model made ready while the slide is read.

Importing torch and the engines takes seconds (about 2.5 s on 2 cores), longer than tiling a biopsy.
A run therefore loads its model in a background thread and starts reading tiles at once; the scorer
waits for the model only when its first chunk of tiles is written. A checkpoint whose weights never
loaded before is still checked first, so weights that do not fit the architecture are refused before
the output folder is touched (``wsi_dala.model.checked_weights``).
"""

from __future__ import annotations

import threading
from pathlib import Path

from wsi_dala.core.config import ScoringConfig
from wsi_dala.model.card import KnownCheckpoint
from wsi_dala.model.checked_weights import checked_before, record_checked, record_path


class ModelPreparation:
    """Loads ``known``'s model (weights strictly checked) on the CPU in a background thread."""

    def __init__(self, known: KnownCheckpoint, config: ScoringConfig) -> None:
        self.known = known
        self._record = record_path(known)  # fixed now: a load still running after its run ended writes here
        self._error: BaseException | None = None
        if config.devices == "all":  # needs torch.cuda and dask-cuda: said before any work, in one line
            from wsi_dala.inference.scoring import check_devices

            check_devices(config)
        self._thread = threading.Thread(target=self._prepare, name="wsi-dala-model", daemon=True)
        self._thread.start()
        if not checked_before(known):
            self.wait()  # a new checkpoint: weights that do not fit are refused before any output

    def _prepare(self) -> None:
        try:
            from wsi_dala.inference.scoring import cached_model

            cached_model(str(self.known.path), "cpu")
            record_checked(self.known, self._record)
        except BaseException as exc:  # re-raised in the run's thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the model is loaded; raise what loading it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    @property
    def checkpoint(self) -> Path:
        return self.known.path
