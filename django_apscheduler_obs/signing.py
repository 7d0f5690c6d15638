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
from collections.abc import Callable

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
    # Same value as django.utils.crypto.salted_hmac(_SALT, payload, secret, "sha256");
    # hmac.digest is OpenSSL's one-shot HMAC, several times cheaper than hmac.new per row.
    return hmac.digest(_key(secret), payload, "sha256").hex().encode()


def sign(payload: bytes) -> bytes:
    if not conf.SIGN_JOB_STATE:
        return payload
    return PREFIX + _signature(payload, settings.SECRET_KEY) + b"$" + payload


def is_signed(state: bytes) -> bool:
    return state.startswith(PREFIX)


def _unsigned_payload(state: bytes) -> bytes:
    return state[len(PREFIX) + _SIG_LEN + 1 :] if is_signed(state) else state


def current_keys() -> tuple[bytes, ...] | None:
    """The keys a signature may be made with now, current first; None if states are not
    signed."""
    if not conf.SIGN_JOB_STATE:
        return None
    secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return tuple(_key(s) for s in secrets)


def signature(state: bytes) -> bytes | None:
    """The signature part of a signed state (it names the payload), or None if unsigned."""
    end = len(PREFIX) + _SIG_LEN
    if state.startswith(PREFIX) and state[end : end + 1] == b"$":
        return state[len(PREFIX) : end]
    return None


def verifier() -> Callable[[bytes], bytes]:
    """``verify`` with the settings read once: for a pass that restores many rows.

    Reading three lazy settings per row cost more than the HMAC itself (profiled on a pass
    restoring 10,000 due jobs).
    """
    return verifier_for(current_keys())


def verifier_for(keys: tuple[bytes, ...] | None) -> Callable[[bytes], bytes]:
    """``verify`` with the keys ``current_keys()`` returned."""
    if keys is None:
        return _unsigned_payload
    payload_start = len(PREFIX) + _SIG_LEN + 1

    def verify_state(state: bytes) -> bytes:
        sig = signature(state)
        if sig is None:
            raise BadSignature("job state is not signed")
        payload = state[payload_start:]
        for key in keys:
            if hmac.compare_digest(sig, hmac.digest(key, payload, "sha256").hex().encode()):
                return payload
        raise BadSignature("job state signature does not match SECRET_KEY or its fallbacks")

    return verify_state


def verify(state: bytes) -> bytes:
    """The pickled payload of a signed state; raises ``BadSignature`` otherwise."""
    return verifier()(state)


def resign(state: bytes) -> bytes:
    """Sign an unsigned (django-apscheduler 0.7) state, or re-sign a valid one with the
    current key; a signed state that does not verify raises ``BadSignature``."""
    return sign(verify(state) if is_signed(state) else state)
