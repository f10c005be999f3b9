"""How long a refused client is told to wait: ``Retry-After`` and ``retry-after-ms``.

Every answer that says when to come back (a full queue, a rate-limited or failing
upstream) gets its headers from ``retry_headers``, so every one of them stays within what
clients honour; the Gemini rendering's ``RetryInfo.retryDelay`` is read from the same
``Retry-After`` (server/wire/gemini.py ``gemini_body``).
"""

from __future__ import annotations

import math

# The most we ever ask a client to wait. The openai SDK (>= 2.52) does not retry at all
# when told to wait more than 120 s: a long drain estimate (135 s under a burst of 380
# requests) turned every 429 into a final error. google-genai does not retry by default,
# and its opt-in retries ignore the header and back off at most 60 s. So we say at most
# 60 s, within both: a client that comes back before the queue has drained gets another 429 with a
# fresh estimate, which is better than one that never comes back. Messages may still
# quote the real estimate.
MAX_RETRY_AFTER_S = 60.0

# Never "come back now": a 0 makes clients retry in a tight loop.
MIN_RETRY_AFTER_S = 1.0


def advertised_wait_s(estimate_s: float) -> float:
    """The wait we advertise for an estimate: within [MIN, MAX]; NaN or negative -> MIN."""
    if not estimate_s > MIN_RETRY_AFTER_S:  # also catches NaN
        return MIN_RETRY_AFTER_S
    return min(estimate_s, MAX_RETRY_AFTER_S)


def retry_headers(estimate_s: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up: never sooner than we mean) and
    ``retry-after-ms``, which the openai SDK prefers, both capped."""
    wait = advertised_wait_s(estimate_s)
    return {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(round(wait * 1000))}
