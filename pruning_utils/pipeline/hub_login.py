"""Hugging Face login for gated models, from whichever token source the machine has.

Sources, first found wins: the explicit argument; the `HF_TOKEN` / `HUGGING_FACE_HUB_TOKEN` environment variables;
a Kaggle secret named HF_TOKEN; a Colab secret named HF_TOKEN. Public models need no token, so finding none is a
skip, not an error. The token is never printed, logged or returned: the status names only where it came from.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

SECRET_NAME = "HF_TOKEN"
ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
NO_TOKEN = ("skipped: no token found (public models need none; for gated models set HF_TOKEN or add a "
            "Kaggle/Colab secret named HF_TOKEN)")
OFFLINE = "skipped: offline (HF_HUB_OFFLINE=1)"
_TRUTHY = {"1", "true", "yes", "on"}


def _clean(token) -> str | None:
    token = token.strip() if isinstance(token, str) else None
    return token or None


def _kaggle_token() -> str | None:
    try:
        from kaggle_secrets import UserSecretsClient
    except ImportError:
        return None
    try:
        return _clean(UserSecretsClient().get_secret(SECRET_NAME))
    except Exception:  # a missing secret, or a notebook without secrets attached, raises its own client errors
        return None


def _colab_token() -> str | None:
    try:
        from google.colab import userdata
    except ImportError:
        return None
    try:
        return _clean(userdata.get(SECRET_NAME))
    except Exception:  # SecretNotFoundError / NotebookAccessError when the secret is absent or not granted
        return None


def find_token(token: str | None = None, environ: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """Return `(token or None, the source it came from)` in the documented order of sources."""
    if _clean(token):
        return _clean(token), "argument"
    for name in ENV_NAMES:
        if _clean(environ.get(name)):
            return _clean(environ.get(name)), f"{name} environment variable"
    found = _kaggle_token()
    if found:
        return found, f"Kaggle secret {SECRET_NAME}"
    found = _colab_token()
    if found:
        return found, f"Colab secret {SECRET_NAME}"
    return None, "none"


def hub_login(token: str | None = None, environ: Mapping[str, str] = os.environ,
              login: Callable[..., object] | None = None) -> str:
    """Return a one-line status of logging in to the Hugging Face Hub (the token itself never appears in it)."""
    if str(environ.get("HF_HUB_OFFLINE", "")).strip().lower() in _TRUTHY:
        return OFFLINE
    token, source = find_token(token, environ)
    if token is None:
        return NO_TOKEN
    if login is None:
        from huggingface_hub import login
    try:
        login(token=token, add_to_git_credential=False)
    except Exception as err:  # a bad token or no network: report it, the run goes on for public models
        return f"login failed: {type(err).__name__}: {str(err).replace(token, '***')}"
    return f"logged in (token from {source})"


def login_for(model_spec: str, environ: Mapping[str, str] = os.environ,
              login: Callable[..., object] | None = None) -> str:
    """Return the status of `hub_login` when `model_spec` is a hub id (a gated one may need the token), else a skip."""
    from pruning_utils.model.loading import is_hub_id

    if not is_hub_id(model_spec):
        return f"skipped: '{model_spec}' is not a hub id"
    return hub_login(environ=environ, login=login)
