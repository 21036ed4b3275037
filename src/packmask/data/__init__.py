"""Data around the core: packing datasets into rows, chat data, the collator, and the packed loss.

``binpack`` (numba row assignment) -> ``arrow`` (moving token spans of Arrow buffers) ->
``packing`` (:func:`pack_lengths`, :func:`pack_dataset`, ``PackingStats``) and ``streaming``
(:func:`pack_iterable`); ``chat`` (conversations to ``input_ids`` / ``labels``); ``threads``
(numba's pool sized from torch's, torch's never changed); ``collator``; ``loss``.
"""
