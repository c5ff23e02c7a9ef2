"""Secrets never leave the process: the config, run names, tags and error lines are redacted.

A value is secret when its key is named like key/token/secret/password, or when it contains the
value of ``WANDB_API_KEY`` or ``HF_TOKEN`` (wherever it appears), or a Hugging Face token
(``hf_...``). Not every 40-hex string: git commits look the same and are recorded on purpose.
"""

from __future__ import annotations

import os
import re

_SECRET_KEY = re.compile(r"(key|token|secret|password|passwd|credential)", re.IGNORECASE)
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")  # a Hugging Face access token
_SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN")
MASK = "***"


def redact_text(text: str) -> str:
    """``text`` with the secrets of ``_SECRET_ENV`` and token-like strings replaced by ``***``."""
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 8 and secret in text:
            text = text.replace(secret, MASK)
    return _TOKEN_LIKE.sub(MASK, text)


def redact(values: dict) -> dict:
    """Copy of a (nested or flat) config dict with secrets hidden: values of keys named like
    key/token/secret/password, and secret strings wherever they appear in a value."""

    def clean(key: str, v):
        if isinstance(v, dict):
            return {k: clean(k, x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(key, x) for x in v]
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and v not in (None, ""):
            return MASK
        if isinstance(v, str):
            return redact_text(v)
        return v

    return {k: clean(k, v) for k, v in values.items()}
