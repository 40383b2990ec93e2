import pytest

from tests.tiny import CHATML, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with NO chat template (like a base model)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A tiny random Qwen2 WITH a ChatML chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-chat"), arch="qwen2", chat_template=CHATML)
