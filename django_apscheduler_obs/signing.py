"""Signed job state.

Job state is a pickle, so anyone who can write the jobs table could run code in the
scheduler. Each stored state carries an HMAC-SHA256 keyed from ``SECRET_KEY``; a state whose
signature does not match (tampered, or written with a key we no longer know) is refused
before ``pickle.loads`` ever sees it. ``SECRET_KEY_FALLBACKS`` lets keys rotate.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from django.conf import settings

from django_apscheduler_obs.conf import conf

PREFIX = b"daos1$"
_SALT = "django_apscheduler_obs.job_state"
_SIG_LEN = 64  # hex sha256


class BadSignature(Exception):
    """The stored job state is unsigned or its signature does not match any known key."""


@functools.lru_cache(maxsize=8)
def _key(secret: str | bytes) -> bytes:
    """The key ``salted_hmac`` derives from (salt, secret); derived once, not per job."""
    return hashlib.sha256(
        (_SALT + (secret.decode() if isinstance(secret, bytes) else secret)).encode()
    ).digest()


def _signature(payload: bytes, secret: str | bytes) -> bytes:
    # Same value as django.utils.crypto.salted_hmac(_SALT, payload, secret, "sha256").
    return hmac.new(_key(secret), payload, hashlib.sha256).hexdigest().encode()


def sign(payload: bytes) -> bytes:
    if not conf.SIGN_JOB_STATE:
        return payload
    return PREFIX + _signature(payload, settings.SECRET_KEY) + b"$" + payload


def is_signed(state: bytes) -> bool:
    return state.startswith(PREFIX)


def verify(state: bytes) -> bytes:
    """The pickled payload of a signed state; raises ``BadSignature`` otherwise."""
    if not conf.SIGN_JOB_STATE:
        return state[len(PREFIX) + _SIG_LEN + 1 :] if is_signed(state) else state
    if not is_signed(state) or state[len(PREFIX) + _SIG_LEN : len(PREFIX) + _SIG_LEN + 1] != b"$":
        raise BadSignature("job state is not signed")
    sig = state[len(PREFIX) : len(PREFIX) + _SIG_LEN]
    payload = state[len(PREFIX) + _SIG_LEN + 1 :]
    for secret in [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]:
        if hmac.compare_digest(sig, _signature(payload, secret)):
            return payload
    raise BadSignature("job state signature does not match SECRET_KEY or its fallbacks")


def resign(state: bytes) -> bytes:
    """Sign an unsigned (django-apscheduler 0.7) state, or re-sign a valid one with the
    current key; a signed state that does not verify raises ``BadSignature``."""
    return sign(verify(state) if is_signed(state) else state)
