"""Every limit the gateway keeps, in one place: rate limits, parallel slots, budgets and the
gateway-wide upstream limits.

    keys.py      the store keys, named once (every limit of a team shares the team's hash tag)
    plans.py     a limit scope's checks, built once: rpm, tpm, parallel; slot ids; the stale-slot policy
    tokens.py    what a request reserves against tpm, and the reconciliation with its real usage
    state.py     what one request holds (``RequestContext.limits``): declared, taken, to settle
    limiter.py   admission in one store call, settlement, the fail-open/closed policy, the replay
                 backlog and ``drain``
    refusal.py   decisions → x-ratelimit-* headers and 429s
    upstream.py  the gateway-wide limits on what is sent to each provider and upstream model

Plugins only declare what they limit (``ctx.limits.checks``); the limiter takes, settles and
reconciles. This package imports nothing of the request path but the context and the store's types.
"""
