"""SSL methods, found by name (`--method simclr`). Each file registers its method class."""

from __future__ import annotations

from stream_ssl.methods import barlow, byol, dino, mocov3, simclr, swav, vicreg  # noqa: F401  (registers)
from stream_ssl.methods.base import METHODS, SSLMethod, build_method, register  # noqa: F401
