"""The password policy: at least 12 characters, not the clinician's own identifier, not a
well-known password.

The list of well-known passwords is shipped here, as a module, on purpose: no maintained
Python package of breached passwords is among this project's dependencies (zxcvbn's ports
are unmaintained, the Have I Been Pwned range API needs the internet, which a hospital
network may not give the server). Every password shorter than 12 characters is refused by
length anyway, so the list holds only longer ones: the longer entries of the public top-10k
lists (SecLists), keyboard walks, and the Vietnamese and hospital-flavoured ones a clinician
is likely to pick first. It is matched case-insensitively and with spaces removed.
"""

from __future__ import annotations

MIN_LENGTH = 12
MAX_LENGTH = 256
"""More is refused before hashing: Argon2 costs the same whatever the length, but a
megabyte password still has to be read, kept and hashed."""

COMMON_PASSWORDS = frozenset({
    "123456789012", "1234567890123", "12345678901234", "123456123456", "123123123123",
    "111111111111", "000000000000", "123412341234", "1q2w3e4r5t6y", "1qaz2wsx3edc",
    "qwertyuiopas", "qwertyuiop12", "qwertyuiop123", "qwerty123456", "qwertyqwerty",
    "asdfghjkl123", "asdfasdfasdf", "zxcvbnm12345", "zaq12wsxcde3", "q1w2e3r4t5y6",
    "password1234", "password12345", "password123456", "passwordpassword", "password123!",
    "passw0rd1234", "p@ssw0rd1234", "p@ssword1234", "iloveyou1234", "iloveyouforever",
    "letmein12345", "welcome12345", "welcome@1234", "administrator", "administrator1",
    "admin1234567", "adminadmin12", "changeme1234", "trustno11234", "sunshine1234",
    "football1234", "baseball1234", "princess1234", "superman1234", "starwars1234",
    "abcdefghijkl", "abcdefgh1234", "abc123456789", "abcd12345678", "aaaaaaaaaaaa",
    "monkey123456", "dragon123456", "master123456", "whatever1234", "computer1234",
    "internet1234", "football12345", "1234567890qwerty", "qwerty1234567890",
    # Vietnamese and local ones.
    "matkhau12345", "matkhau123456", "matkhaumoi123", "anhyeuem1234", "anhyeuem123456",
    "emyeuanh1234", "emyeuanh123456", "yeuemnhieu123", "vietnam12345", "vietnam123456",
    "vietnam@1234", "hanoi1234567", "saigon123456", "hochiminh123", "hochiminh1234",
    "bacsi1234567", "bacsi123456789", "benhvien1234", "benhvien12345", "benhvien@123",
    "yte123456789", "ytexa1234567", "telehealth123", "telehealth1234", "telehealthbridge",
    "tuvanxa12345", "khambenh1234", "khambenh12345",
})


def problem(password: str, identifier: str) -> str | None:
    """Why ``password`` may not be used by ``identifier``, or None if it may (the reason is
    shown to the clinician; it never repeats the password)."""
    if len(password) < MIN_LENGTH:
        return f"a password needs at least {MIN_LENGTH} characters, this one has {len(password)}"
    if len(password) > MAX_LENGTH:
        return f"a password may have at most {MAX_LENGTH} characters"
    folded = "".join(password.split()).casefold()
    ident = identifier.casefold()
    if folded == ident or (len(ident) >= 4 and ident in folded):
        return "a password may not contain your identifier"
    if folded in COMMON_PASSWORDS or len(set(folded)) <= 2:
        return "this password is among the most common ones; choose another"
    return None
