"""Rate limits as the upstream counts them: requests and tokens per minute, per model (pure logic).

``headers`` reads what the upstream says (x-ratelimit-*, Retry-After), ``tokens`` estimates what a
call costs before it is made, ``book`` keeps each model's state (ceilings over a sliding window,
the upstream's reported remaining budget, cooldowns) and decides whether a call may go now.
"""
