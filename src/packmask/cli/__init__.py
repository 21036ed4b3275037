"""The ``packmask`` command: ``demo``, ``pack``, ``stats``, ``verify``, ``bench``."""
from .main import main

__all__ = ["main"]
