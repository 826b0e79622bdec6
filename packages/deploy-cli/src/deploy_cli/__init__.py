"""deploy-cli: the ``deploy`` console script."""

from ._main import main
from ._version import __version__

__all__ = ["__version__", "main"]
