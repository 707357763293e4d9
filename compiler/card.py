"""The model card: what momentprop writes into an exported file's ONNX metadata (no torch needed to read it)."""

from __future__ import annotations

import json

CARD_PREFIX = "momentprop."  # the model card's keys in the ONNX metadata


def read_model_card(metadata: dict[str, str]) -> dict[str, object]:
    """The ``momentprop.*`` entries of an ONNX file's metadata, without the prefix, JSON values decoded."""
    card: dict[str, object] = {}
    for key, value in metadata.items():
        if key.startswith(CARD_PREFIX):
            try:
                card[key[len(CARD_PREFIX):]] = json.loads(value)
            except ValueError:
                card[key[len(CARD_PREFIX):]] = value
    return card
