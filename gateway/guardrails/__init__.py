"""Content guardrails: named rules (a pattern, or a built-in detector) that block, redact or flag what
goes to a model and what comes back, matched in linear time (RE2).

    detectors.py  the built-in detectors (email, phone, credit_card, iban, ip_address, secret) and
                  the compilation of user patterns, refused at config time when RE2 cannot run them
    engine.py     the rules of a request (``teams[].guardrails``) applied to its text (``Guard``), to a
                  whole answer, and to a stream as it is relayed (``StreamGuard``: held back only as far
                  as the rules need); the metric and the log lines (never the matched text)
"""
