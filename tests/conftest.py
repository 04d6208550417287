"""Shared fixtures: tiny random models per family, the embedded model loaded once per session."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M (fp32, CPU), loaded once; tests must not modify it in place."""
    from pruning_utils.model.loading import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """Point the project's models/ folder to a temporary one, so tests never touch the real checkpoints."""
    from pruning_utils import paths

    monkeypatch.setattr(paths, "MODELS_DIR", tmp_path / "models")
    return tmp_path / "models"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one torch thread, restored afterwards:
    tiny models spend more on thread hand-offs than on math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
