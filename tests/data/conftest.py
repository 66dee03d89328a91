"""Fixtures for the data package tests: a tiny byte-level BPE tokenizer trained in memory and
a tiny random Llama sized to it (both built in well under a second, nothing downloaded)."""

from __future__ import annotations

import pytest

from data_helpers import CHAT_TEMPLATE, make_llama, make_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    return make_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return make_llama(tokenizer)
