"""The old import path of :mod:`fastsam3d.modeling.sparse` (experimental), kept so that code
written against ``fastsam3d.modeling.sparse_attention`` keeps working. New code imports
``fastsam3d.modeling.sparse``."""

from __future__ import annotations

from .sparse import *  # noqa: F403
from .sparse import __all__  # noqa: F401
