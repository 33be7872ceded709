"""The built-in detectors (true and false positives, exact spans) and user patterns under RE2."""

from __future__ import annotations

import itertools
import random
import string

import pytest

from gateway.guardrails.detectors import DETECTORS, Detector, compile_pattern, find_pattern


def found(name: str, text: str) -> list[str]:
    spans = DETECTORS[name].find(text)
    assert spans == sorted(spans)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "overlapping spans"
    assert all(end - start <= DETECTORS[name].max_chars for start, end in spans)
    return [text[start:end] for start, end in spans]


def only(name: str, text: str) -> str:
    """The one match in ``text``, which must be the whole of it."""
    assert DETECTORS[name].find(text) == [(0, len(text))], text
    return text


def test_the_detectors_and_their_api() -> None:
    assert set(DETECTORS) == {"email", "phone", "credit_card", "iban", "ip_address", "secret"}
    for name, detector in DETECTORS.items():
        assert detector.name == name
        assert detector.pattern.isascii()
        compile_pattern(detector.pattern)  # plain RE2 syntax
        assert detector.description.endswith(".") and len(detector.description) > 80
        assert detector.max_chars > 0
        assert detector.find("") == []
        assert detector.find("nothing to see here, move along.") == []
    assert DETECTORS["secret"].max_chars == 8192


def test_a_detector_built_from_a_bare_pattern_finds_its_matches() -> None:
    digits = Detector("digits", r"[0-9]+", "Runs of digits.", 32)
    assert digits.find("a 12 b 345") == [(2, 4), (7, 10)]


def test_spans_are_character_offsets_in_text_with_non_ascii_characters() -> None:
    text = "Grüße von José — jose@example.es, ☎ +34 912 345 678, 日本 4111 1111 1111 1111 ✓"
    for name, expected in [
        ("email", "jose@example.es"),
        ("phone", "+34 912 345 678"),
        ("credit_card", "4111 1111 1111 1111"),
    ]:
        ((start, end),) = DETECTORS[name].find(text)
        assert text[start:end] == expected
    # a non-ASCII letter is not a word character for the boundaries, nor part of a match
    assert found("email", "josé@example.com") == []
    assert found("credit_card", "n°4111111111111111") == ["4111111111111111"]


# --- email -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "email",
    [
        "john.doe@example.com",
        "a@b.co",
        "first.last+tag@mail.example.co.uk",
        "under_score%x-y@sub-domain.example.museum",
        "UPPER@EXAMPLE.ORG",
        "x1@123.example.io",
    ],
)
def test_email_addresses_are_found(email: str) -> None:
    only("email", email)


def test_email_spans_and_several_in_one_text() -> None:
    text = "Write to john@example.com, cc: ops.team@corp.example.org; (bob+x@ex.io)."
    assert found("email", text) == ["john@example.com", "ops.team@corp.example.org", "bob+x@ex.io"]
    assert DETECTORS["email"].find("to: a@b.io!") == [(4, 10)]
    assert found("email", "mailto:john@x.org and <jane@y.net>") == ["john@x.org", "jane@y.net"]
    assert found("email", "end of sentence: name@example.com.") == ["name@example.com"]


@pytest.mark.parametrize(
    "text",
    [
        "user@localhost",  # no top-level domain
        "x@y",
        "foo@bar.c",  # a one-letter top-level domain
        "john@example.com1",  # run into a digit
        "john@example.c0m",
        "x@-bad.com",  # a label starting with a hyphen
        "x@bad-.com",
        "user@[192.168.1.1]",
        "@example.com",
        "not an email: john at example dot com",
        "josé@example.com",  # non-ASCII local part
    ],
)
def test_not_email_addresses(text: str) -> None:
    assert found("email", text) == []


def test_email_with_an_overlong_local_part_matches_its_last_64_characters() -> None:
    text = "a" * 70 + "@b.cc"
    assert found("email", text) == ["a" * 64 + "@b.cc"]


# --- phone -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phone",
    [
        "+1 415 555 2671",
        "+1-415-555-2671",
        "+1 (415) 555-2671",
        "+14155552671",
        "+44 20 7946 0958",
        "+49 (0)30 1234567",
        "+33 1 23 45 67 89",
        "+81 3-1234-5678",
        "(415) 555-2671",
        "(415)555-2671",
        "415-555-2671",
        "415.555.2671",
        "415 555 2671",
        "1-800-555-1234",
        "1 (800) 555-1234",
        "020 7946 0958",
        "(030) 1234567",
        "06 12 34 56 78",
        "03-1234-5678",
        "0044 20 7946 0958",
    ],
)
def test_phone_numbers_are_found(phone: str) -> None:
    only("phone", phone)


def test_phone_spans_and_several_in_one_text() -> None:
    text = "Call +1 (415) 555-2671 or 020 7946 0958, fax 415.555.2672."
    assert found("phone", text) == ["+1 (415) 555-2671", "020 7946 0958", "415.555.2672"]
    assert DETECTORS["phone"].find("tel: 415-555-2671.") == [(5, 17)]
    assert found("phone", "on 2024-01-15 call 415-555-2671") == ["415-555-2671"]


@pytest.mark.parametrize(
    "text",
    [
        "2024-01-15",  # dates
        "01-15-2024",
        "15.01.2024",
        "05 06 2024",
        "on 2024-01-15T10:30:00Z",
        "192.168.1.1",  # IP addresses
        "010.020.030.040",
        "Order #123456789",  # order numbers: plain runs
        "order number 1234567890",
        "invoice 20240115001",
        "+1 555",  # too few digits
        "+1 234 567",
        "+1234567890123456",  # too many digits (16)
        "5+12345678",  # arithmetic
        "2024-415-555-2671",  # part of a longer dashed number
        "415-555-2671-99",
        "1.415.555.2671.5",
        "v415.555.2671",  # run into letters
        "415-555-2671x",
        "4155552671",  # no separators
        "555-1234",  # no area code
        "ISBN 978-3-16-148410-0",
        "version 1.2.3.4.5",
        "12:30:45",
    ],
)
def test_not_phone_numbers(text: str) -> None:
    assert found("phone", text) == []


def test_phone_digit_count_bounds() -> None:
    only("phone", "+1 234 5678")  # 8 digits
    assert found("phone", "+1 234 567") == []  # 7
    only("phone", "+123 4567 8901 2345")  # 15
    assert found("phone", "+1234567890123456") == []  # 16
    # groups taken in past 15 digits are dropped from the end
    assert found("phone", "+123 4567 8901 23456") == ["+123 4567 8901"]
    assert found("phone", "+1 415 555 2671 9999 8888") == ["+1 415 555 2671 9999"]


# --- credit_card ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",  # Visa
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5555555555554444",  # Mastercard
        "5105 1051 0510 5100",
        "378282246310005",  # American Express, 15 digits
        "3782 822463 10005",
        "3056 930902 5904",  # Diners, 14 digits
        "6011111111111117",  # Discover
        "4222222222222",  # 13 digits
        "6304000000000000000",  # 19 digits
        "4111 1111 1111 1111 110",  # 4-4-4-4-3 (19), Luhn-valid as a whole
        "4000-0000-0000-0002",
    ],
)
def test_card_numbers_are_found(card: str) -> None:
    only("credit_card", card)


def test_card_spans_and_several_in_one_text() -> None:
    text = "cards: 4111111111111111, 5555-5555-5555-4444 and 3782 822463 10005."
    assert found("credit_card", text) == ["4111111111111111", "5555-5555-5555-4444", "3782 822463 10005"]
    assert DETECTORS["credit_card"].find("pay 4111111111111111 now") == [(4, 20)]
    # a following expiry or CVV is not taken in
    assert found("credit_card", "4111 1111 1111 1111 12/25") == ["4111 1111 1111 1111"]
    assert found("credit_card", "5555 5555 5555 4444 123") == ["5555 5555 5555 4444"]
    assert found("credit_card", "4111 1111 1111 1111 12.50 EUR") == ["4111 1111 1111 1111"]
    assert found("credit_card", "1234 4111 1111 1111 1111") == ["4111 1111 1111 1111"]


def luhn_invalid(card: str) -> str:
    last = card[-1]
    return card[:-1] + ("0" if last != "0" else "1")


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # Luhn-invalid
        luhn_invalid("4111 1111 1111 1111"),
        luhn_invalid("378282246310005"),
        luhn_invalid("6011111111111117"),
        "1234567812345678",
        "0000000000000000",  # one digit repeated (Luhn-valid)
        "0000 0000 0000 0000",
        "41111111111111111111",  # 20 digits: a longer run
        "14111111111111111",  # a valid card inside a longer digit run
        "41111111111111110",
        "x4111111111111111",  # run into letters
        "4111111111111111abc",
        "4111-1111-1111-1111-1234",  # part of a longer dashed number
        "2024-4111-1111-1111-1111",
        "4111111111111111.50",
        "4111 1111-1111 1111",  # mixed separators
        "4111  1111 1111 1111",  # a double space
        "411111111111",  # 12 digits
        "phone 415-555-2671",
    ],
)
def test_not_card_numbers(text: str) -> None:
    assert found("credit_card", text) == []


def test_random_card_numbers_agree_with_luhn() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        number = "".join(rng.choice(string.digits) for _ in range(rng.randint(13, 19)))
        total = 0
        for i, c in enumerate(reversed(number)):
            d = int(c) * (2 if i % 2 else 1)
            total += d - 9 if d > 9 else d
        valid = total % 10 == 0 and len(set(number)) > 1
        assert (found("credit_card", f"n {number} x") == [number]) is valid, number


# --- iban ----------------------------------------------------------------------------------------------


def make_iban(country: str, bban: str) -> str:
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


def grouped(iban: str) -> str:
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))


@pytest.mark.parametrize(
    "iban",
    [
        "GB82WEST12345698765432",
        "GB82 WEST 1234 5698 7654 32",
        "DE89370400440532013000",
        "DE89 3704 0044 0532 0130 00",
        "FR1420041010050500013M02606",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91ABNA0417164300",
        "BE68 5390 0754 7034",
        "NO9386011117947",  # the shortest: 15
        "MT84MALT011000012345MTLCAST001S",  # 31
        make_iban("LC", "HEMM000100010012001200023015"),  # 32
        make_iban("RU", "04452522540817810538091310419"),  # 33
        grouped(make_iban("XK", "1212012345678906")),
    ],
)
def test_ibans_are_found(iban: str) -> None:
    only("iban", iban)


def test_iban_spans_and_several_in_one_text() -> None:
    text = "Pay DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432; thanks."
    assert found("iban", text) == ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432"]
    assert DETECTORS["iban"].find("IBAN: NL91ABNA0417164300.") == [(6, 24)]
    # a following word in capitals that the groups took in is left out
    assert found("iban", "BE68 5390 0754 7034 THEN SEND IT") == ["BE68 5390 0754 7034"]
    assert found("iban", "GB82 WEST 1234 5698 7654 32 BIC NWBKGB2L") == ["GB82 WEST 1234 5698 7654 32"]


@pytest.mark.parametrize(
    "text",
    [
        "DE88 3704 0044 0532 0130 00",  # a wrong check digit
        "DE89 3704 0044 0532 0130 01",  # a wrong digit
        "GB82WEST12345698765433",
        "GB28WEST12345698765432",  # check digits swapped
        "gb82west12345698765432",  # lower case
        "XGB82WEST12345698765432",  # run into letters or digits
        "GB82WEST123456987654321",
        "DE89  3704 0044 0532 0130 00",  # a double space
        "DE8937040044",  # too short
        "AB12CDEFGHIJKLMNOPQ",  # the shape only
        "ISO 13616 MOD 97 CHECK",
    ],
)
def test_not_ibans(text: str) -> None:
    assert found("iban", text) == []


def test_random_ibans_are_found_and_any_changed_character_spoils_them() -> None:
    rng = random.Random(97)
    alphabet = string.ascii_uppercase + string.digits
    for _ in range(300):
        country = "".join(rng.choice(string.ascii_uppercase) for _ in range(2))
        bban = "".join(rng.choice(alphabet) for _ in range(rng.randint(11, 30)))
        iban = make_iban(country, bban)
        if not "02" <= iban[2:4] <= "98":
            continue
        only("iban", iban)
        only("iban", grouped(iban))
        i = rng.randrange(4, len(iban))
        changed = iban[:i] + rng.choice(alphabet.replace(iban[i], "")) + iban[i + 1 :]
        assert found("iban", changed) == [], changed  # mod 97 catches every single substitution


# --- ip_address ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip",
    [
        "192.168.1.1",
        "10.0.0.1",
        "8.8.8.8",
        "255.255.255.255",
        "0.0.0.0",  # noqa: S104 (text, not a binding)
        "2001:db8::8a2e:370:7334",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "2001:DB8:0:0:8:800:200C:417A",
        "fe80::1ff:fe23:4567:890a",
        "::ffff:192.168.1.1",
        "2001:db8::",
    ],
)
def test_ip_addresses_are_found(ip: str) -> None:
    only("ip_address", ip)


def test_ip_spans_and_several_in_one_text() -> None:
    text = "from 10.0.0.1 and 2001:db8::1:2 via 8.8.8.8, range 10.0.0.1-10.0.0.255."
    assert found("ip_address", text) == ["10.0.0.1", "2001:db8::1:2", "8.8.8.8", "10.0.0.1", "10.0.0.255"]
    assert DETECTORS["ip_address"].find("GET http://1.2.3.4:8080/x") == [(11, 18)]
    assert found("ip_address", "[2001:db8::1]:443 and 2001:db8::2: down") == ["2001:db8::1", "2001:db8::2"]
    assert found("ip_address", "the host is 1.2.3.4.") == ["1.2.3.4"]


@pytest.mark.parametrize(
    "text",
    [
        "999.1.1.1",  # an octet over 255
        "256.1.1.1",
        "1.2.3.256",
        "1.2.3.4.5",  # a version string
        "version 1.2.3.4.5.6.7.8",
        "9.1.2.3.4",
        "v1.2.3.4",  # run into letters
        "1.2.3.4a",
        "01.02.03.04",  # leading zeros
        "192.168.001.001",
        "1.2.3",
        "::1",  # short IPv6 forms
        "fe80::1",
        "x[::2]",
        "std::vector<int>",
        "a::b::c",
        "00:1a:2b:3c:4d:5e",  # a MAC address
        "12:30:45",  # a time
        "2001:db8::g1",
        "1:2:3:4:5:6:7:8:9",
        "2001:db8::1::2",
    ],
)
def test_not_ip_addresses(text: str) -> None:
    assert found("ip_address", text) == []


# --- secret ------------------------------------------------------------------------------------------------

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "-----END RSA PRIVATE KEY-----"
)
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)


@pytest.mark.parametrize(
    "secret",
    [
        "sk-" + "A1b2C3d4E5f6G7h8I9j0" * 2 + "abcdefgh",  # OpenAI, legacy
        "sk-proj-" + "Ab3_dE-9" * 20,
        "sk-ant-api03-" + "x" * 93 + "AA",
        "sk-svcacct-abcdefghijklmnopqrstuvwx",
        "AKIAIOSFODNN7EXAMPLE",
        "ASIAY34FZKBOKMUTVV7A",
        "ghp_" + "a1B2" * 9,
        "gho_16C7e42F292c6912E7710c838347Ae178B4a",
        "ghs_" + "Z" * 36,
        "github_pat_11ABCDEFG0123456789abc_" + "q" * 59,
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "xoxp-12345-67890-abcdef",
        "AIzaSyA-1234567890abcdefghijklmnopqrstu",
        "sk_live_51H8abcdefghijklmnopqrstu",
        "rk_live_abcdefghij1234567890",
        JWT,
        PEM,
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg\n-----END EC PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\r\nMIIFHDBOBgkqhkiG9w0BBQ0w\r\n"
        "-----END ENCRYPTED PRIVATE KEY-----",
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\n"
        "hmjKt7xQ0h6vBZbMXSBhzvYm\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\n\nlQOYBF\n=abcd\n"
        "-----END PGP PRIVATE KEY BLOCK-----",
    ],
)
def test_secrets_are_found(secret: str) -> None:
    only("secret", secret)


def test_secret_spans_and_several_in_one_text() -> None:
    aws = "AKIAIOSFODNN7EXAMPLE"
    gh = "ghp_" + "a1B2" * 9
    text = f"export AWS_ACCESS_KEY_ID={aws}\nAuthorization: Bearer {JWT}\ntoken={gh}; key:\n{PEM}\nbye"
    assert found("secret", text) == [aws, JWT, gh, PEM]
    assert DETECTORS["secret"].find(f"key: {aws}.") == [(5, 25)]


def test_a_pem_block_is_matched_whole_even_in_a_json_string() -> None:
    body = "\\n".join("MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj" for _ in range(40))
    pem = f"-----BEGIN PRIVATE KEY-----\\n{body}\\n-----END PRIVATE KEY-----"
    text = f'{{"type": "service_account", "private_key": "{pem}\\n", "client_email": "x@y.iam"}}'
    assert found("secret", text) == [pem]
    # a 4096-bit key is some 3300 characters
    long_pem = "-----BEGIN PRIVATE KEY-----\n" + ("A" * 64 + "\n") * 52 + "-----END PRIVATE KEY-----"
    assert 3000 < len(long_pem) < 8192
    only("secret", long_pem)


def test_a_pem_block_longer_than_max_chars_is_not_a_match() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\n" + ("A" * 64 + "\n") * 130 + "-----END PRIVATE KEY-----"
    assert len(pem) > DETECTORS["secret"].max_chars
    assert found("secret", pem) == []
    assert found("secret", f"{pem} then AKIAIOSFODNN7EXAMPLE") == ["AKIAIOSFODNN7EXAMPLE"]


@pytest.mark.parametrize(
    "text",
    [
        "sk-abc",  # sk- and 3 characters
        "sk-" + "a" * 19,
        "task-abcdefghijklmnopqrstuvwxyz0123",  # sk- inside a word
        "risk-adjusted-return-on-capital-metrics",
        "AKIAIOSFODNN7EXAMPL",  # AWS: 15 after the prefix
        "AKIAIOSFODNN7EXAMPLEX",  # 17
        "XAKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a" * 35,  # GitHub: too short
        "ghx_" + "a" * 36,
        "github_pat_short",
        "xoxb-123",  # Slack: too short
        "xoxz-1234567890-abcdef",
        "AIza" + "B" * 34,  # Google: 34
        "sk_test_51H8abcdefghijklmnopqrstu",  # Stripe test keys
        "pk_live_51H8abcdefghijklmnopqrstu",  # Stripe publishable keys
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.",  # an unsigned JWT
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0",  # two segments
        "eyJabc.def.ghi",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkq\n-----END CERTIFICATE-----",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n(truncated)",  # no END line
        "the api key is in the vault",
    ],
)
def test_not_secrets(text: str) -> None:
    assert found("secret", text) == []


# --- all together -------------------------------------------------------------------------------------------


def test_each_detector_finds_only_its_own_in_a_mixed_text() -> None:
    text = (
        "Hi, I'm jane.doe@example.com (+44 20 7946 0958). Card 4111 1111 1111 1111, "
        "IBAN GB82 WEST 1234 5698 7654 32, from 203.0.113.7 / 2001:db8::7:1, "
        "key AKIAIOSFODNN7EXAMPLE, build v1.2.3.4.5 on 2024-01-15, order #1234567890123."
    )
    assert found("email", text) == ["jane.doe@example.com"]
    assert found("phone", text) == ["+44 20 7946 0958"]
    assert found("credit_card", text) == ["4111 1111 1111 1111"]
    assert found("iban", text) == ["GB82 WEST 1234 5698 7654 32"]
    assert found("ip_address", text) == ["203.0.113.7", "2001:db8::7:1"]
    assert found("secret", text) == ["AKIAIOSFODNN7EXAMPLE"]


def test_matches_never_exceed_max_chars_on_random_text() -> None:
    rng = random.Random(7)
    pieces = [
        "4111", "1111", " ", "-", ".", ":", "::", "+", "(", ")", "0", "12", "255", "ab", "AB12", "@",
        "x.com", "sk-", "AKIA", "eyJ", "\n", "é", "DE89", "3704", "a" * 30, "9" * 7,
    ]  # fmt: skip
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(300))
        for name in DETECTORS:
            found(name, text)  # asserts order, no overlap and max_chars


# --- user patterns ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "backreference"),
        (r"(?P<x>a)(?P=x)", "backreference"),
        (r"(?=a)b", "lookahead"),
        (r"(?!a)b", "lookahead"),
        (r"(?<=a)b", "lookbehind"),
        (r"(?<!a)b", "lookbehind"),
        (r"(unclosed", "syntax"),
        (r"a{2000}", "repetition"),
        (r"x\Z", "escape"),
    ],
)
def test_compile_pattern_refuses_what_re2_cannot_run(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=r"^not supported by the linear-time engine: ") as info:
        compile_pattern(pattern)
    if why in ("backreference", "lookahead", "lookbehind"):
        assert why in str(info.value)


def test_compile_pattern_logs_nothing_when_it_refuses(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):
        compile_pattern(r"(a)\1")
    assert capfd.readouterr().err == ""


def test_find_pattern_spans() -> None:
    compiled = compile_pattern(r"(?i)\bproject\s+(?:zeus|hera)\b")
    text = "About Project Zeus and project  hera, not projectzeus. Ünïcödé PROJECT ZEUS!"
    assert [text[s:e] for s, e in find_pattern(compiled, text)] == [
        "Project Zeus",
        "project  hera",
        "PROJECT ZEUS",
    ]
    ((start, end),) = find_pattern(compile_pattern("Zeus"), "日本語 Zeus")
    assert (start, end) == (4, 8)  # character offsets
    assert find_pattern(compile_pattern("b*"), "abba") == [(1, 3)]  # empty matches skipped
    assert find_pattern(compile_pattern(""), "text") == []
    assert find_pattern(compile_pattern("nope"), "") == []


def test_the_catastrophic_pattern_runs_in_linear_time() -> None:
    compiled = compile_pattern(r"(a+)+$")
    assert find_pattern(compiled, "a" * 100_000 + "b") == []
    assert find_pattern(compiled, "b" + "a" * 100_000) == [(1, 100_001)]
    assert find_pattern(compile_pattern(r"(x+x+)+y"), "x" * 50_000) == []


@pytest.mark.parametrize(
    "text",
    [
        "1111 " * 10_000,  # every group a card candidate
        "1111-" * 10_000,
        "1." * 25_000,  # one long dotted number
        "a:" * 25_000,
        "AB12 CDEF " * 5_000,
        ("a" * 70 + "@b.cc ") * 700,
        "a@" + "b." * 25_000,
        "eyJ" + "a" * 50_000,
        ("-----BEGIN PRIVATE KEY-----\n" + "AKIAAAAAAAAAAAAAAAAA " * 3) * 500,
        "+1 " * 16_000,
    ],
)
def test_adversarial_texts_are_scanned_without_blowing_up(text: str) -> None:
    for name in DETECTORS:
        found(name, text)
