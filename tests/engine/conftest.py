"""Shared fixtures for the stage engine's tests: the real models, resolved once per test session."""
from __future__ import annotations

import pytest

from consortium.models import resolve_model
from consortium.tokenizer import Tokenizer

SEED_PROMPT = "Explain in one paragraph why the sky appears blue."


@pytest.fixture(scope="session")
def default_model() -> str:
    return str(resolve_model(None))


@pytest.fixture(scope="session")
def gemma_model() -> str:
    return str(resolve_model("gemma3-270m"))


@pytest.fixture(scope="session")
def seed_prompt_ids(default_model) -> list[int]:
    tok = Tokenizer(default_model)
    try:
        return tok.prompt_tokens(SEED_PROMPT)
    finally:
        tok.close()
