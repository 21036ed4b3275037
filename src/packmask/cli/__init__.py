"""The ``packmask`` command: ``demo``, ``pack``, ``stats``, ``verify``, ``bench``.

Modules, one responsibility each: :mod:`.parser` (arguments, standard library only),
:mod:`.main` (dispatch, errors, signals), :mod:`.inputs` and :mod:`.records` (reading and checking
INPUT), :mod:`.output` (atomic writing, checks before work), :mod:`.pack` (``pack`` / ``stats``),
:mod:`.report` and :mod:`.plots` (what is printed and drawn), :mod:`.commands` (``demo`` /
``verify``), :mod:`.bench`, :mod:`.demo` and :mod:`.demo_train`.
"""
from .main import main

__all__ = ["main"]
