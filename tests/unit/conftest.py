from __future__ import annotations

import pytest
from transformers import PreTrainedModel

from raffm.models import load_global_model


@pytest.fixture(scope="session")
def minilm() -> PreTrainedModel:
    """The real all-MiniLM-L6-v2 (shipped in a package), with a 2-label head."""
    return load_global_model()
