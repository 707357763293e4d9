"""Task modules; importing one registers its task (see ``registry.py``)."""

from . import uci, classification  # noqa: F401,I001  (registration order = report order: task 1, task 2)
