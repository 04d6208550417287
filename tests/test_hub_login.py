"""Hugging Face login: the order of token sources, the skips, and the token never showing in any output."""
import sys
import types

import pytest

from pruning_utils.pipeline.hub_login import NO_TOKEN, OFFLINE, hub_login

TOKEN = "hf_secretTOKEN0123456789"


class FakeLogin:
    """A stand-in for `huggingface_hub.login` that records the tokens it was given."""

    def __init__(self, error: Exception | None = None):
        self.tokens, self.error = [], error

    def __call__(self, token=None, add_to_git_credential=True):
        assert add_to_git_credential is False
        self.tokens.append(token)
        if self.error is not None:
            raise self.error


@pytest.fixture(autouse=True)
def no_notebook_secrets(monkeypatch):
    """Make the Kaggle and Colab clients unimportable unless a test installs a fake one."""
    monkeypatch.setitem(sys.modules, "kaggle_secrets", None)
    monkeypatch.setitem(sys.modules, "google.colab", None)


def fake_kaggle(monkeypatch, secret: str | None):
    class UserSecretsClient:
        def get_secret(self, name):
            assert name == "HF_TOKEN"
            if secret is None:
                raise RuntimeError("secret not found")
            return secret

    monkeypatch.setitem(sys.modules, "kaggle_secrets", types.SimpleNamespace(UserSecretsClient=UserSecretsClient))


def test_offline_skips_even_with_a_token():
    login = FakeLogin()
    assert hub_login(TOKEN, environ={"HF_HUB_OFFLINE": "1"}, login=login) == OFFLINE
    assert login.tokens == []


def test_no_token_anywhere_skips():
    login = FakeLogin()
    assert hub_login(environ={"HF_HUB_OFFLINE": "0"}, login=login) == NO_TOKEN
    assert login.tokens == []


def test_env_token_is_passed_to_login(capsys):
    login = FakeLogin()
    status = hub_login(environ={"HF_TOKEN": TOKEN}, login=login)
    assert login.tokens == [TOKEN]
    assert status == "logged in (token from HF_TOKEN environment variable)"
    out = capsys.readouterr()
    assert TOKEN not in status + out.out + out.err


def test_legacy_env_name_is_read():
    login = FakeLogin()
    assert "HUGGING_FACE_HUB_TOKEN" in hub_login(environ={"HUGGING_FACE_HUB_TOKEN": TOKEN}, login=login)
    assert login.tokens == [TOKEN]


def test_explicit_token_wins_over_env_and_secrets(monkeypatch):
    fake_kaggle(monkeypatch, "hf_fromkaggle")
    login = FakeLogin()
    status = hub_login(TOKEN, environ={"HF_TOKEN": "hf_fromenv"}, login=login)
    assert login.tokens == [TOKEN]
    assert status == "logged in (token from argument)"


def test_kaggle_secret_is_used_when_env_has_none(monkeypatch, capsys):
    fake_kaggle(monkeypatch, TOKEN)
    login = FakeLogin()
    status = hub_login(environ={}, login=login)
    assert login.tokens == [TOKEN]
    assert status == "logged in (token from Kaggle secret HF_TOKEN)"
    out = capsys.readouterr()
    assert TOKEN not in status + out.out + out.err


def test_missing_kaggle_secret_falls_through_to_colab(monkeypatch):
    fake_kaggle(monkeypatch, None)

    def get(name):
        return TOKEN

    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=get)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    login = FakeLogin()
    assert hub_login(environ={}, login=login) == "logged in (token from Colab secret HF_TOKEN)"
    assert login.tokens == [TOKEN]


def test_missing_colab_secret_is_a_skip(monkeypatch):
    def get(name):
        raise KeyError("SecretNotFoundError: HF_TOKEN")

    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=get)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert hub_login(environ={}, login=FakeLogin()) == NO_TOKEN


def test_failed_login_redacts_the_token(capsys):
    login = FakeLogin(ValueError(f"Invalid token passed: {TOKEN}"))
    status = hub_login(environ={"HF_TOKEN": TOKEN}, login=login)
    assert status == "login failed: ValueError: Invalid token passed: ***"
    out = capsys.readouterr()
    assert TOKEN not in status + out.out + out.err


def test_login_for_asks_only_for_hub_ids(tmp_path, monkeypatch):
    from pruning_utils.pipeline.hub_login import login_for

    fake = FakeLogin()
    env = {"HF_TOKEN": TOKEN}
    assert login_for("smollm2-135m", environ=env, login=fake).startswith("skipped: 'smollm2-135m' is not a hub id")
    assert login_for(str(tmp_path), environ=env, login=fake).startswith("skipped")
    assert fake.tokens == []
    assert login_for("meta-llama/Llama-3.2-1B", environ=env, login=fake) == \
        "logged in (token from HF_TOKEN environment variable)"
    assert fake.tokens == [TOKEN]
