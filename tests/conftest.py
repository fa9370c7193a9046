"""Shared fixtures over the tiny models of ``tiny_models.py``; hypothesis replays a fixed set of cases in CI."""

import os

import pytest
import torch
from hypothesis import settings
from tiny_models import MODELS


@pytest.fixture(params=sorted(MODELS))
def make_model(request):
    """A factory for one tiny architecture (Llama with nn.Linear, GPT-2 with Conv1D); same seed, same weights."""
    return MODELS[request.param]


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


# Property tests explore new random cases locally; in CI (CI=true) they replay a fixed set, so a run is reproducible.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
