"""The built-in content detectors, and the compilation of user patterns, all matched by RE2.

RE2 runs in time linear in the text: no pattern, built-in or configured, can be made to backtrack
catastrophically. What RE2 cannot run in linear time (backreferences, lookaround) is refused when the
configuration is read (``compile_pattern``), never at request time.

A detector searches with RE2 for *candidates* and then validates each in Python (Luhn, ISO 13616
mod-97, digit counts, ``ipaddress``): a candidate that fails is not a match, and the search goes on
from its next character (or, for part of a longer dotted or dashed number, past that number's end,
found by RE2). Python never searches the text. The built-in patterns are ASCII-only, so
the text is searched with each non-ASCII character read as ``?`` (one byte per character, so RE2's
byte offsets are character offsets; RE2's ``\\b`` and classes are ASCII anyway). Every repetition
that could run long is bounded, or its candidate is length-checked and skipped past as a whole, so
that finding all matches stays linear as well.
"""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import re2  # type: ignore[import-untyped]

CompiledPattern = Any  # a compiled RE2 pattern (google-re2 has no type hints)

# A check gets the text (and the bytes RE2 searches, for anchored look-ups) and a candidate's span. It
# answers (True, stop) to accept text[start:stop] (stop <= end: a candidate may be trimmed back to the
# end of an earlier group, when the pattern took in a trailing group that is not part of it), or
# (False, resume) to reject the candidate, the search going on at ``resume`` (at least start + 1;
# further when no match can start before it, e.g. past the rest of a longer dotted number).
Check = Callable[[str, bytes, int, int], tuple[bool, int]]

_DIGITS = frozenset(string.digits)
_WORD = frozenset(string.ascii_letters + string.digits + "_")
_ALNUM = frozenset(string.ascii_letters + string.digits)


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would log refusals through absl, on stderr
    return options


_OPTIONS = _options()


def _compile(pattern: str) -> Any:
    return re2.compile(pattern, options=_OPTIONS)


class _Scanner:
    """One compiled built-in pattern and the check of its candidates."""

    __slots__ = ("check", "regex")

    def __init__(self, pattern: str, check: Check | None) -> None:
        self.regex = _compile(pattern)
        self.check = check

    def spans(self, text: str, data: bytes) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        search = self.regex.search
        check = self.check
        pos = 0
        while (found := search(data, pos)) is not None:
            start, end = found.span()
            if end == start:  # no built-in pattern matches the empty string; a plain one might
                pos = start + 1
                continue
            if check is None:
                out.append((start, end))
                pos = end
                continue
            accepted, at = check(text, data, start, end)
            if accepted:
                out.append((start, at))
                pos = at
            else:
                pos = max(at, start + 1)
        return out


@dataclass(frozen=True, slots=True)
class Detector:
    """A built-in detector: an RE2 pattern (``pattern``, the union of ``parts``) whose candidates are
    validated. ``parts`` are searched one by one, each with its own check, and their matches merged:
    keeping alternatives apart keeps a long-lived candidate of one (a PEM block) from making RE2
    rescan the text for each match of another."""

    name: str
    pattern: str  # RE2 syntax, ASCII only; compiled once, at import
    description: str  # one sentence for the README: what is and what is not caught
    max_chars: int  # the longest text one match can span (the stream text held back)
    parts: tuple[tuple[str, Check | None], ...] = field(default=(), repr=False, compare=False)
    _scanners: tuple[_Scanner, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = self.parts or ((self.pattern, None),)
        object.__setattr__(self, "_scanners", tuple(_Scanner(p, check) for p, check in parts))

    def find(self, text: str) -> list[tuple[int, int]]:
        """The (start, end) character spans of the validated matches, in order, never overlapping."""
        if not text:
            return []
        data = text.encode("ascii", "replace")  # one byte per character: offsets are the text's
        if len(self._scanners) == 1:
            return self._scanners[0].spans(text, data)
        spans = [span for scanner in self._scanners for span in scanner.spans(text, data)]
        return _disjoint(spans)


def _disjoint(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """In order; of overlapping spans the one starting first (then the longest) is kept."""
    spans.sort(key=lambda span: (span[0], -span[1]))
    out: list[tuple[int, int]] = []
    last = 0
    for start, end in spans:
        if start >= last:
            out.append((start, end))
            last = end
    return out


def _union(parts: tuple[tuple[str, Check | None], ...]) -> str:
    return "|".join(f"(?:{pattern})" for pattern, _ in parts)


# ---------------------------------------------------------------------------------------------------
# Validation helpers (Python looks at a candidate and its neighbouring characters only)


_SEPARATORS = str.maketrans("", "", " .-()+")


def _digits(candidate: str) -> str:
    """The digits of a number candidate (which holds only digits and `` .-()+``)."""
    return candidate.translate(_SEPARATORS)


# The rest of a longer number after a candidate (.5 in 1.2.3.4.5, -1234 in 4111-1111-1111-1111-1234),
# matched anchored: no match can start inside it, as every start there follows a digit and a separator.
_MORE_DOTTED = _compile(r"(?:\.[0-9]+)*")
_MORE_DASHED = _compile(r"(?:[.\-][0-9]+)*")


def _past(more: Any, data: bytes, end: int) -> int:
    found = more.match(data, end)
    return int(found.end()) if found is not None else end


def _glued(text: str, start: int, end: int, seps: str) -> bool:
    """Whether text[start:end] continues a longer number through one of ``seps``: a digit, then a
    separator, right before it (``2024-``, ``1.``), or a separator, then a digit, right after it."""
    before = start >= 2 and text[start - 1] in seps and text[start - 2] in _DIGITS
    after = end + 1 < len(text) and text[end] in seps and text[end + 1] in _DIGITS
    return before or after


def _group_ends(text: str, start: int, end: int, seps: str) -> Iterator[int]:
    """``end``, then the end of each earlier group of the candidate, longest first: the places where a
    separator follows a letter, a digit or a closing parenthesis."""
    yield end
    for i in range(end - 1, start, -1):
        if text[i] in seps and (text[i - 1] in _ALNUM or text[i - 1] == ")"):
            yield i


_LUHN_DOUBLED = str.maketrans("0123456789", "0246813579")  # 2d, less 9 when over 9


def _luhn(digits: str) -> bool:
    """Every second digit from the right doubled (less 9 when over 9): the sum is a multiple of 10."""
    backwards = digits[::-1]
    summed = backwards[::2] + backwards[1::2].translate(_LUHN_DOUBLED)
    return (sum(summed.encode()) - 48 * len(summed)) % 10 == 0


# ---------------------------------------------------------------------------------------------------
# email

_EMAIL_MAX = 64 + 1 + 253  # local part, "@", domain
_EMAIL = (r"[A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9\-]+\.)+[A-Za-z]{2,63}\b",)


def _check_email(text: str, data: bytes, start: int, end: int) -> tuple[bool, int]:
    at = text.index("@", start, end)
    domain = text[at + 1 : end]
    if len(domain) <= 253:
        labels = domain.split(".")
        if all(len(label) <= 63 and label[0] != "-" and label[-1] != "-" for label in labels):
            return True, end
    return False, at + 1  # no candidate with this domain can pass


# ---------------------------------------------------------------------------------------------------
# phone

_SEP = r"[ .\-]"
_PHONE = (
    # international: +CC, an optional (0), then up to 7 groups (one may be in parentheses)
    rf"\B\+[1-9][0-9]{{0,2}}(?:{_SEP}?\(0\))?(?:{_SEP}?(?:\([0-9]{{1,4}}\)|[0-9]{{1,6}})){{1,7}}\b",
    # North American: (415) 555-2671, 415-555-2671, 415.555.2671, 415 555 2671, 1-800-555-1234
    r"(?:\b1 )?\B\([2-9][0-9]{2}\) ?[2-9][0-9]{2}[ .\-][0-9]{4}\b",
    *(rf"\b(?:1{s})?[2-9][0-9]{{2}}{s}[2-9][0-9]{{2}}{s}[0-9]{{4}}\b" for s in (" ", r"\.", "-")),
    # national with a trunk 0: 020 7946 0958, (030) 1234567, 06 12 34 56 78, 03-1234-5678
    *(
        rf"(?:\B\(0[0-9]{{1,4}}\) ?|\b0[0-9]{{1,4}}{s})[0-9]{{2,8}}(?:{s}[0-9]{{2,4}}){{0,4}}\b"
        for s in (" ", r"\.", "-")
    ),
)
_PHONE_MAX = 1 + 3 + 4 + 7 * 7  # +CC, " (0)", 7 groups of a separator and 6 digits or "(dddd)"


def _date_or_ip_shaped(candidate: str) -> bool:
    groups = [len(g) for g in "".join(c if c in _DIGITS else " " for c in candidate).split()]
    if len(groups) == 3 and (
        (groups[0] <= 2 and groups[1] <= 2 and groups[2] == 4)  # 15.01.2024, 01-15-2024
        or (groups[0] == 4 and groups[1] <= 2 and groups[2] <= 2)  # 2024 01 15
    ):
        return True
    return len(groups) == 4 and max(groups) <= 3 and set(candidate) <= _DIGITS | {"."}


def _check_phone(text: str, data: bytes, start: int, end: int) -> tuple[bool, int]:
    for stop in _group_ends(text, start, end, " .-"):
        candidate = text[start:stop]
        count = len(_digits(candidate)) - candidate.count("(0)")
        if count < 8:
            break
        if count <= 15 and not _glued(text, start, stop, ".-") and not _date_or_ip_shaped(candidate):
            return True, stop
    return False, start + 1


# ---------------------------------------------------------------------------------------------------
# credit_card

_CARD = (
    r"\b[0-9]{13,19}\b",
    *(
        rf"\b[0-9]{{4}}{s}[0-9]{{4}}{s}[0-9]{{4}}{s}(?:[0-9]{{4}}(?:{s}[0-9]{{1,3}})?|[0-9]{{1,3}})\b"
        rf"|\b[0-9]{{4}}{s}[0-9]{{6}}{s}[0-9]{{4,5}}\b"
        for s in (" ", "-")
    ),
)
_CARD_MAX = 4 * 4 + 3 + 4  # 4-4-4-4-3 with separators


def _check_card(text: str, data: bytes, start: int, end: int) -> tuple[bool, int]:
    if " " not in text[start:end] and _glued(text, start, end, ".-"):
        # part of a longer dashed or dotted number: so is every candidate up to its end
        return False, _past(_MORE_DASHED, data, end)
    for stop in _group_ends(text, start, end, " -"):
        digits = _digits(text[start:stop])
        if len(digits) < 13:
            break
        if (
            len(digits) <= 19
            and _luhn(digits)
            and digits.count(digits[0]) < len(digits)
            and not _glued(text, start, stop, ".-")
        ):
            return True, stop
    return False, start + 1


# ---------------------------------------------------------------------------------------------------
# iban

_IBAN = (r"\b[A-Z]{2}[0-9]{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7} [A-Z0-9]{1,4})\b",)
_IBAN_MAX = 4 + 7 * 5 + 5  # "CCdd", 7 spaced groups of 4, a last group of up to 4
_IBAN_LETTERS = str.maketrans({c: str(n) for n, c in enumerate(string.ascii_uppercase, 10)})


def _check_iban(text: str, data: bytes, start: int, end: int) -> tuple[bool, int]:
    """ISO 13616: check digits 02-98, and the number read from the BBAN (11-30 characters), then the
    country code and the check digits, with A=10 ... Z=35, is 1 modulo 97. The longest prefix of the
    candidate that ends a group and passes is the match (the pattern may take in a following word)."""
    head = text[start : start + 4]
    if not "02" <= head[2:] <= "98":
        return False, start + 1
    head_digits = head.translate(_IBAN_LETTERS)
    head_value, head_shift = int(head_digits), 10 ** len(head_digits)
    remainder = length = stop = 0
    pos = start + 4
    for group in text[pos:end].split(" "):  # one group unbroken; else "" then the groups of 4
        pos += len(group)
        if group:
            digits = group.translate(_IBAN_LETTERS)
            remainder = (remainder * 10 ** len(digits) + int(digits)) % 97
            length += len(group)
            if 11 <= length <= 30 and (remainder * head_shift + head_value) % 97 == 1:
                stop = pos
        pos += 1
    return (True, stop) if stop else (False, start + 1)


# ---------------------------------------------------------------------------------------------------
# ip_address

_IPV4 = r"\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b"
_IPV6 = r"(?:[0-9A-Fa-f]{0,4}:){2,8}(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{1,4})?"
_IP_MAX = 8 * 5 + 15  # IPv6 candidates: 8 groups and their colons, then an IPv4 tail
_V6_EDGE = _WORD | {":"}


def _check_ipv4(text: str, data: bytes, start: int, end: int) -> tuple[bool, int]:
    if _glued(text, start, end, "."):
        return False, _past(_MORE_DOTTED, data, end)  # a version 1.2.3.4.5: no quad in it is an IP
    try:
        ipaddress.IPv4Address(text[start:end])
    except ValueError:
        return False, start + 1
    return True, end


def _check_ipv6(text: str, data: bytes, start: int, end: int) -> tuple[bool, int]:
    if start > 0 and text[start - 1] in _V6_EDGE:
        # run into a word or a longer colon-separated token: so is every candidate up to its end
        return False, end
    stops = [end]
    if text[end - 1] == ":" and text[end - 2] != ":":  # "... 2001:db8::1: the ..."
        stops.append(end - 1)
    for stop in stops:
        candidate = text[start:stop]
        if candidate.count(":") < 3 or _v6_continues(text, stop):
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        return True, stop
    return False, start + 1


def _v6_continues(text: str, stop: int) -> bool:
    """Whether the text goes on after an IPv6 candidate as part of the same token."""
    if stop >= len(text):
        return False
    nxt = text[stop]
    if nxt in _WORD:
        return True
    return nxt in ":." and stop + 1 < len(text) and text[stop + 1] in _V6_EDGE


# ---------------------------------------------------------------------------------------------------
# secret

_SECRET_MAX = 8192
_TOKENS = (
    r"\b(?:"
    r"sk-[A-Za-z0-9_\-]{20,300}"  # OpenAI sk-, sk-proj-, Anthropic sk-ant-
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}\b"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,251}\b"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,244}\b"  # GitHub fine-grained tokens
    r"|xox[abprs]-[A-Za-z0-9\-]{10,250}"  # Slack
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API key
    r"|[rs]k_live_[A-Za-z0-9]{10,247}"  # Stripe live secret and restricted keys
    r")"
)
_JWT = r"\beyJ[A-Za-z0-9_\-]{12,}\.[A-Za-z0-9_\-]{2,}\.[A-Za-z0-9_\-]{16,}"
_PEM_LABEL = r"(?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?"
_PEM = rf"-----BEGIN {_PEM_LABEL}-----[A-Za-z0-9+/=\s:,.()\\\-]*?-----END {_PEM_LABEL}-----"


def _check_secret_length(text: str, data: bytes, start: int, end: int) -> tuple[bool, int]:
    """JWTs and PEM blocks are unbounded in the pattern: one longer than max_chars is skipped whole."""
    return end - start <= _SECRET_MAX, end


# ---------------------------------------------------------------------------------------------------


def _detector(
    name: str, description: str, max_chars: int, parts: tuple[tuple[str, Check | None], ...]
) -> Detector:
    return Detector(name, _union(parts), description, max_chars, parts)


DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        _detector(
            "email",
            "An email address local@domain.tld in ASCII: a local part of 1-64 letters, digits and"
            " ._%+- (of a longer run only its last 64 characters), then one or more domain labels of"
            " letters, digits and inner hyphens (at most 63 characters each, 253 in all) and a"
            " top-level domain of 2-63 letters not followed by a letter, digit or underscore;"
            " internationalised (non-ASCII) addresses and numeric or punycode top-level domains are"
            " not caught.",
            _EMAIL_MAX,
            tuple((p, _check_email) for p in _EMAIL),
        ),
        _detector(
            "phone",
            "A phone number of 8 to 15 digits in all (of longer groupings, the longest leading part"
            " that ends a group and has at most 15): international +CC then digit groups separated by"
            " spaces, dots or dashes, parentheses allowed around a group, an optional (0)"
            " (+44 20 7946 0958, +1 (415) 555-2671, +14155552671); North American (415) 555-2671,"
            " 415-555-2671, 415.555.2671 or 415 555 2671, with an optional leading 1; or national with"
            " a trunk 0 and one kind of separator (020 7946 0958, (030) 1234567, 06 12 34 56 78); plain"
            " digit runs without separators (order numbers), numbers run into digits or letters or"
            " continuing a dotted or dashed number, date shapes (2024-01-15, 15.01.2024, 01-15-2024)"
            " and dotted quads (IP addresses) are not caught.",
            _PHONE_MAX,
            ((_union(tuple((p, None) for p in _PHONE)), _check_phone),),
        ),
        _detector(
            "credit_card",
            "A payment card number of 13 to 19 digits that passes the Luhn check, written as one run"
            " or grouped 4-4-4-4 (with an optional last group of 1-3), 4-4-4-1..3 or 4-6-4/4-6-5 by"
            " single spaces or single dashes (one kind throughout); a Luhn-invalid number, one digit"
            " repeated, and a number that is part of a longer digit run or glued to letters or to"
            " another number by a dash or dot are not caught.",
            _CARD_MAX,
            ((_union(tuple((p, None) for p in _CARD)), _check_card),),
        ),
        _detector(
            "iban",
            "An IBAN in capitals: two letters, two check digits (02-98) and 11-30 letters or digits,"
            " unbroken or in groups of four separated by single spaces, that passes the ISO 13616"
            " mod-97 check; lower-case IBANs, ones with a wrong check digit, and ones run into other"
            " letters or digits are not caught (the country's own IBAN length is not checked).",
            _IBAN_MAX,
            tuple((p, _check_iban) for p in _IBAN),
        ),
        _detector(
            "ip_address",
            "An IPv4 dotted quad with each octet 0-255 written without leading zeros, or an IPv6"
            " address with at least three colons (optionally ending in an IPv4 quad) that Python's"
            " ipaddress accepts; a quad within a longer dotted number (a version 1.2.3.4.5) or glued to"
            " letters, short IPv6 forms such as ::1 or fe80::1, MAC addresses and times are not caught.",
            _IP_MAX,
            ((_IPV6, _check_ipv6), (_IPV4, _check_ipv4)),
        ),
        _detector(
            "secret",
            "An API key or private key: OpenAI/Anthropic sk- (incl. sk-proj-, sk-ant-) with at least"
            " 20 more characters, AWS access key ids AKIA/ASIA + 16, GitHub ghp_/gho_/ghu_/ghs_/ghr_ +"
            " 36 or more and github_pat_ + 22 or more, Slack xoxa-/xoxb-/xoxp-/xoxr-/xoxs- + 10 or"
            " more, Google AIza + 35, Stripe sk_live_/rk_live_, JWTs (eyJ... header, payload and a"
            " signature of 16 or more characters) and PEM private-key blocks from -----BEGIN ..."
            " PRIVATE KEY----- through their END line, whole (up to 8192 characters); a prefix run into"
            " a longer word, a shorter tail (sk-abc), Stripe test keys, unsigned JWTs, public keys and"
            " certificates are not caught.",
            _SECRET_MAX,
            ((_TOKENS, None), (_JWT, _check_secret_length), (_PEM, _check_secret_length)),
        ),
    )
}


# ---------------------------------------------------------------------------------------------------
# user patterns


def compile_pattern(pattern: str) -> CompiledPattern:
    """A user rule's pattern compiled by RE2, or ValueError for what RE2 cannot run in linear time
    (backreferences, lookaround) or cannot parse."""
    try:
        return _compile(pattern)
    except re2.error as exc:
        raise ValueError(f"not supported by the linear-time engine: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    message = exc.args[0] if exc.args else exc
    reason = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    if reason.endswith(("(?=", "(?!", "(?<=", "(?<!")):
        return f"{reason} (lookahead and lookbehind are not supported)"
    if (reason[-2:-1] == "\\" and reason[-1:] in set("123456789k")) or reason.endswith("(?P"):
        return f"{reason} (backreferences are not supported)"
    return reason


def find_pattern(compiled: CompiledPattern, text: str) -> list[tuple[int, int]]:
    """The (start, end) character spans of a compiled user pattern's matches, in order; empty matches
    are skipped."""
    spans: list[tuple[int, int]] = []
    for match in compiled.finditer(text):
        start, end = match.span()
        if end > start:
            spans.append((start, end))
    return spans
