"""dnnlab: a Hydra-driven lab for every technique of "Training Deep Neural Networks" (Hands-On ML, ch. 11)."""
from pathlib import Path

__version__ = "0.1.0"

# Installed from a wheel, the configs ship inside the package; in a source checkout they sit beside it.
_HERE = Path(__file__).resolve().parent
CONF_DIR = _HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf"
