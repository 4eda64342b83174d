"""Bridges from archives to other tools' inputs (outside the four stages).

Each module reads archives through :mod:`attnscope.store` only and imports the other tool
(and torch, where that tool needs it) inside the functions that hand it data, so importing
a module here costs nothing. ``bertviz``: one sample as ``bertviz.head_view`` /
``model_view`` arguments.
"""
