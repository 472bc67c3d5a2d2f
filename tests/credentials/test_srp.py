"""proxy.credentials.srp against two independent references: a server-side verifier and pycognito."""

from __future__ import annotations

import base64
import datetime
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moto.cognitoidp.utils import check_secret_hash
from pycognito import aws_srp

from proxy.credentials import srp
from tests.credentials.srp_reference import ServerChallenge, as_bytes

POOL_ID = "eu-west-1_Ab12Cd34E"
MOMENT = datetime.datetime(2026, 11, 22, 4, 10, 17, tzinfo=datetime.UTC)
MOMENT_TEXT = "Sun Nov 22 04:10:17 UTC 2026"
BLOCK = base64.b64encode(bytes(range(200))).decode()


def claim_for(
    challenge: ServerChallenge, a: int, password: str, moment: datetime.datetime = MOMENT
) -> srp.PasswordClaim:
    return srp.password_claim(
        a=a,
        user_pool_id=challenge.user_pool_id,
        user_id=challenge.user_id,
        password=password,
        salt_hex=challenge.salt_hex,
        srp_b_hex=challenge.srp_b_hex,
        secret_block=BLOCK,
        moment=moment,
    )


def test_group_constants_match_the_published_ones() -> None:
    assert int(aws_srp.N_HEX, 16) == srp.N
    assert srp.N.bit_length() == 3072
    assert int(aws_srp.hex_hash("00" + aws_srp.N_HEX + "0" + aws_srp.G_HEX), 16) == srp.MULTIPLIER


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (MOMENT, "Sun Nov 22 04:10:17 UTC 2026"),
        (datetime.datetime(2026, 11, 2, 4, 5, 6, tzinfo=datetime.UTC), "Mon Nov 2 04:05:06 UTC 2026"),
        (datetime.datetime(2027, 1, 1, 0, 0, 0, tzinfo=datetime.UTC), "Fri Jan 1 00:00:00 UTC 2027"),
        # An aware time in another zone is converted to UTC first.
        (
            datetime.datetime(2026, 9, 5, 1, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
            "Fri Sep 4 23:00:00 UTC 2026",
        ),
    ],
)
def test_timestamp_format_has_an_unpadded_day(moment: datetime.datetime, expected: str) -> None:
    assert srp.cognito_timestamp(moment) == expected


def test_timestamp_names_are_english_whatever_the_locale() -> None:
    """Names are spelt out, not taken from strftime, so LC_TIME cannot change them."""
    days = [srp.cognito_timestamp(MOMENT + datetime.timedelta(days=n)).split()[0] for n in range(7)]
    assert days == ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
    months = [srp.cognito_timestamp(MOMENT.replace(month=m, day=1)).split()[1] for m in range(1, 13)]
    assert months == ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


@given(st.integers(min_value=0, max_value=2**3100))
def test_pad_hex_is_the_minimal_twos_complement_encoding(number: int) -> None:
    assert bytes.fromhex(srp.pad_hex(number)) == as_bytes(number)
    assert srp.pad_hex(number) == aws_srp.pad_hex(number)


def test_a_correct_password_satisfies_the_server_verifier() -> None:
    a = srp.generate_private_value()
    challenge = ServerChallenge.start(POOL_ID, "3f1c9a1e-user", "Corr3ct-Horse!", srp.public_value(a))
    claim = claim_for(challenge, a, "Corr3ct-Horse!")
    assert claim.timestamp == "Sun Nov 22 04:10:17 UTC 2026"
    assert claim.secret_block == BLOCK
    assert challenge.accepts(BLOCK, claim.timestamp, claim.signature)


def test_a_wrong_password_does_not() -> None:
    a = srp.generate_private_value()
    challenge = ServerChallenge.start(POOL_ID, "alice", "Corr3ct-Horse!", srp.public_value(a))
    assert not challenge.accepts(BLOCK, MOMENT_TEXT, claim_for(challenge, a, "corr3ct-Horse!").signature)


def test_the_signature_covers_the_timestamp_and_the_secret_block() -> None:
    a = srp.generate_private_value()
    challenge = ServerChallenge.start(POOL_ID, "alice", "pw", srp.public_value(a))
    claim = claim_for(challenge, a, "pw")
    assert not challenge.accepts(BLOCK, "Sun Nov 22 04:10:18 UTC 2026", claim.signature)
    other_block = base64.b64encode(b"another block").decode()
    assert not challenge.accepts(other_block, claim.timestamp, claim.signature)


@settings(max_examples=8, deadline=None)
@given(
    password=st.text(min_size=1, max_size=40),
    user_id=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=30),
    pool_suffix=st.from_regex(r"[A-Za-z0-9]{9}", fullmatch=True),
    a=st.integers(min_value=1, max_value=2**1024),
    salt=st.integers(min_value=1, max_value=2**256),
)
def test_any_inputs_agree_with_the_server_side_reference(
    password: str, user_id: str, pool_suffix: str, a: int, salt: int
) -> None:
    challenge = ServerChallenge.start(f"us-east-2_{pool_suffix}", user_id, password, srp.public_value(a), salt=salt)
    claim = claim_for(challenge, a, password)
    assert challenge.accepts(BLOCK, claim.timestamp, claim.signature)


def test_same_inputs_give_the_same_proof_as_pycognito(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed a, salt, B, timestamp: pycognito's AWSSRP must produce the identical PASSWORD_CLAIM_SIGNATURE."""
    a = 0x1234567890ABCDEF * 2**900 + 77
    challenge = ServerChallenge.start(
        POOL_ID, "user-id-for-srp", "Pässwörd 1!", srp.public_value(a), salt=0xA1B2C3, b=99
    )
    reference = aws_srp.AWSSRP("alice", "Pässwörd 1!", POOL_ID, "client", client=object())
    reference.small_a_value, reference.large_a_value = a, srp.public_value(a)
    naive_utc = MOMENT.replace(tzinfo=None)
    monkeypatch.setattr(
        aws_srp, "datetime", types.SimpleNamespace(datetime=types.SimpleNamespace(utcnow=lambda: naive_utc))
    )
    parameters = {
        "USERNAME": "alice",
        "USER_ID_FOR_SRP": "user-id-for-srp",
        "SALT": challenge.salt_hex,
        "SRP_B": challenge.srp_b_hex,
        "SECRET_BLOCK": BLOCK,
    }
    theirs = reference.process_challenge(parameters, {"USERNAME": "alice"})
    ours = claim_for(challenge, a, "Pässwörd 1!").as_challenge_responses()
    assert ours["PASSWORD_CLAIM_SIGNATURE"] == theirs["PASSWORD_CLAIM_SIGNATURE"]
    assert ours["TIMESTAMP"] == theirs["TIMESTAMP"]
    assert ours["PASSWORD_CLAIM_SECRET_BLOCK"] == theirs["PASSWORD_CLAIM_SECRET_BLOCK"]
    assert format(srp.public_value(a), "x") == reference.get_auth_params()["SRP_A"]


def test_session_key_matches_pycognito() -> None:
    a = srp.generate_private_value()
    reference = aws_srp.AWSSRP("bob", "pw", POOL_ID, "client", client=object())
    reference.small_a_value, reference.large_a_value = a, srp.public_value(a)
    big_b, salt = 0x5EED * 2**2000 + 3, 0x7F00FF
    theirs = reference.get_password_authentication_key("bob", "pw", big_b, format(salt, "x"))
    u = srp.scrambling_parameter(srp.public_value(a), big_b)
    x = srp.password_exponent(salt, POOL_ID, "bob", "pw")
    assert srp.session_key(srp.premaster_secret(big_b, a, u, x), u) == bytes(theirs)


def test_secret_hash_is_what_cognito_checks() -> None:
    value = srp.secret_hash("client-secret-value", "alice@example.com", "client123")
    assert check_secret_hash("client-secret-value", "client123", "alice@example.com", value)
    assert not check_secret_hash("client-secret-value", "client123", "bob@example.com", value)


@pytest.mark.parametrize("bad_b", [0, srp.N, 2 * srp.N])
def test_a_b_of_zero_mod_n_is_refused(bad_b: int) -> None:
    with pytest.raises(srp.SrpError):
        srp.password_claim(
            a=5, user_pool_id=POOL_ID, user_id="u", password="p", salt_hex="ab",
            srp_b_hex=format(bad_b, "x"), secret_block=BLOCK, moment=MOMENT,
        )  # fmt: skip


def test_garbage_challenge_parameters_raise_srp_errors() -> None:
    with pytest.raises(srp.SrpError):
        srp.password_claim(
            a=5, user_pool_id=POOL_ID, user_id="u", password="p", salt_hex="not hex",
            srp_b_hex="ff", secret_block=BLOCK, moment=MOMENT,
        )  # fmt: skip
    with pytest.raises(srp.SrpError):
        srp.password_claim(
            a=5, user_pool_id=POOL_ID, user_id="u", password="p", salt_hex="ab",
            srp_b_hex="ff", secret_block="abcde", moment=MOMENT,
        )  # fmt: skip


def test_private_values_are_fresh_and_in_range() -> None:
    values = {srp.generate_private_value() for _ in range(20)}
    assert len(values) == 20
    assert all(0 < value < srp.N for value in values)


def test_the_claim_repr_shows_no_signature() -> None:
    a = srp.generate_private_value()
    challenge = ServerChallenge.start(POOL_ID, "alice", "pw", srp.public_value(a))
    claim = claim_for(challenge, a, "pw")
    assert claim.signature not in repr(claim)
    assert BLOCK not in repr(claim)
