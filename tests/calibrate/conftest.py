import pytest
from calib_helpers import ByteTokenizer, tiny_llama


@pytest.fixture
def tok():
    return ByteTokenizer()


@pytest.fixture
def model():
    return tiny_llama()
