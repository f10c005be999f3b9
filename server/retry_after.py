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

# Never "come back now": a 0 makes clients retry in a tight loop. Retry-After counts whole
# seconds, so it says at least 1; retry-after-ms (which the openai SDK reads first) says a
# drain of 0.3 s as 300, down to this floor.
MIN_RETRY_AFTER_S = 1.0
MIN_RETRY_AFTER_MS = 100.0

# On an answer a retry cannot change (a spent quota, a deterministic failure): the openai
# SDK does not retry when it reads this.
NO_RETRY = {"x-should-retry": "false"}


def advertised_wait_s(estimate_s: float) -> float:
    """The wait we advertise for an estimate: within [MIN, MAX]; NaN or negative -> MIN."""
    if not estimate_s > MIN_RETRY_AFTER_S:  # also catches NaN
        return MIN_RETRY_AFTER_S
    return min(estimate_s, MAX_RETRY_AFTER_S)


def retry_headers(estimate_s: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up: never sooner than we mean, at least
    1) and ``retry-after-ms`` to the millisecond (a sub-second drain as it is), both
    capped; an estimate that is not a number says 1 s."""
    wait = advertised_wait_s(estimate_s)
    ms = 1000.0 if not estimate_s >= 0 else min(max(estimate_s * 1000, MIN_RETRY_AFTER_MS),
                                                  MAX_RETRY_AFTER_S * 1000)
    return {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(round(ms))}
