"""Task modules; importing one registers its task (see ``registry.py``)."""

from . import uci, classification  # noqa: F401  (registration order = report order: task 1, task 2)
from . import vit  # noqa: F401  (task 3: small ViT on Fashion-MNIST)
from . import gpt2  # noqa: F401  (task 4: small GPT-2 on Shakespeare)
from . import cnn  # noqa: F401  (task 5: CNNs on Fashion-MNIST)
from . import tabular  # noqa: F401  (task 6: small tabular classification, marglik-tuned Laplace)
