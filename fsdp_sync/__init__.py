"""fsdp_sync: move fresh FSDP2 weights into inference-engine buffers at the speed of the links."""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

# Installs map the top-level kernels/ folder to fsdp_sync.kernels. Run from a source checkout
# (the package found on the current directory, or a path-based editable install), that map
# is either not consulted or, when an editable install of another checkout (a git worktree's
# main checkout, say) is in the environment, points into that checkout: so a package loaded
# from a source checkout always takes the kernels/ folder beside it.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_folder = _os.path.join(_root, "kernels")
if (not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernels"))
        and _os.path.isfile(_os.path.join(_root, "pyproject.toml"))
        and _os.path.isfile(_os.path.join(_folder, "__init__.py"))):
    _spec = _importlib_util.spec_from_file_location(__name__ + ".kernels", _os.path.join(_folder, "__init__.py"),
                                                    submodule_search_locations=[_folder])
    _sys.modules[__name__ + ".kernels"] = _importlib_util.module_from_spec(_spec)
    _spec.loader.exec_module(_sys.modules[__name__ + ".kernels"])
    kernels = _sys.modules[__name__ + ".kernels"]  # as the import system would bind it

from ._version import __version__
from .config import LinkModel, SyncConfig
from .destinations import allocate_destinations, expected_destinations, mismatches
from .errors import NonFiniteWeights, PlanError, SyncError, SyncTimeout, TrainerGone
from .meta import LayoutSpec
from .receiver import WeightReceiver
from .sender import PushHandle, PushResult, WeightSender

__all__ = [
    "LayoutSpec", "LinkModel", "NonFiniteWeights", "PlanError", "PushHandle", "PushResult", "SyncConfig", "SyncError",
    "SyncTimeout", "TrainerGone", "WeightReceiver", "WeightSender", "__version__", "allocate_destinations",
    "expected_destinations", "mismatches",
]
