import os

import pytest

from char_tokenizer import CharTokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture
def fixtures_dir():
    return FIXTURES
