"""The password hasher the test process uses: Django's PBKDF2 at a single iteration.

Django's default (PBKDF2, a million iterations) costs about half a second of CPU per hash, and
nearly every test makes personas with passwords — on the suite's two cores that was the largest
single cost of the run. A single-iteration hash keeps the algorithm's name, ``pbkdf2_sha256``, and
PBKDF2 verifies with the iterations stored in the hash, so a live server (its own, real hashers)
still accepts these users' passwords — and upgrades the hash on their first sign-in there, as it
would any weaker hash. Tests about passwords themselves (strength, throttling, resets) are
unaffected: only the work factor changes.
"""

from __future__ import annotations

from django.contrib.auth.hashers import PBKDF2PasswordHasher


class SingleIterationPBKDF2(PBKDF2PasswordHasher):
    iterations = 1
