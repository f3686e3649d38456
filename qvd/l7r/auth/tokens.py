"""
Bearer tokens and stored authentication parameters (reference 1.2, 2.1).

    grant = await create_auth_token(db, result, now=reactor.seconds())
    grant.auth_params_id, grant.auth_token    # JSON of /qvd/create_auth_token
    params_id = await store_auth_parameters(db, result.params)   # store_auth=1
    found = await redeem_token(db, token, now)  # RedeemedToken or None

A token is a random string kept in C{user_tokens}; clients send
C{Authorization: Bearer base64(token)}. Unlike the original (whose check made
every token single-use), C{multi_use} is taken from the row: multi-use tokens
work until they expire, single-use ones are deleted when redeemed, in the
same transaction, so two requests cannot both use one.
"""

import base64
import json
import secrets

import attrs
from psycopg2.extras import Json

from qvd.db.pool import fetch_dicts

#: Lifetime of the tokens made for /qvd/create_auth_token (seconds).
DEFAULT_LIFETIME = 24 * 3600


@attrs.frozen
class TokenGrant:
    """
    A token just created.

    @ivar token: the raw token, as stored in C{user_tokens.token}.
    @ivar auth_token: what the client gets: base64 of the token plus a
        newline, as the original's JSON carried it.
    @ivar expiration: expiry instant, seconds since the epoch.
    """
    auth_params_id: int
    token: str = attrs.field(repr=False)
    auth_token: str = attrs.field(repr=False)
    expiration: int


@attrs.frozen
class RedeemedToken:
    """
    A valid token's row: who it belongs to and the parameters stored with it.
    """
    user_id: int
    vm_id: int
    multi_use: bool
    params: dict


def encode_token(token):
    """
    The value a client puts after C{Bearer } (without the newline).
    """
    return base64.b64encode(token.encode("utf-8")).decode("ascii")


def store_auth_parameters(db, params):
    """
    Store C{params} in C{user_auth_parameters}.

    @return: a Deferred firing with the new row's id.
    """
    d = db.runQuery(
        "INSERT INTO user_auth_parameters (parameters) VALUES (%s) RETURNING id",
        (Json(dict(params)),))
    return d.addCallback(lambda rows: rows[0][0])


def create_auth_token(db, result, now, lifetime=DEFAULT_LIFETIME, multi_use=True, vm_id=None):
    """
    Store C{result.params} and a new token for C{result.user_id} valid for
    C{lifetime} seconds from C{now} (for the VM C{vm_id} if given); drop
    that user's expired tokens.

    @param result: an L{qvd.l7r.auth.interfaces.AuthResult}.
    @return: a Deferred firing with a L{TokenGrant}.
    """
    token = secrets.token_urlsafe(32)
    expiration = int(now) + int(lifetime)

    async def interaction(cursor):
        await cursor.execute(
            "INSERT INTO user_auth_parameters (parameters) VALUES (%s) RETURNING id",
            (Json(dict(result.params)),))
        params_id = cursor.fetchall()[0][0]
        await cursor.execute(
            "DELETE FROM user_tokens WHERE user_id = %s AND expiration <= %s",
            (result.user_id, int(now)))
        await cursor.execute(
            "INSERT INTO user_tokens (token, user_id, vm_id, expiration, auth_params_id,"
            " multi_use) VALUES (%s, %s, %s, %s, %s, %s)",
            (token, result.user_id, vm_id, expiration, params_id, multi_use))
        return TokenGrant(params_id, token, encode_token(token) + "\n", expiration)
    return db.transaction(interaction)


def _text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else json.dumps(value) if isinstance(value, (dict, list)) \
        else str(value)


def redeem_token(db, token, now):
    """
    Look C{token} up; delete it if it is single-use.

    @return: a Deferred firing with a L{RedeemedToken}, or None when there is
        no such token or it expired.
    """
    async def interaction(cursor):
        await cursor.execute(
            "SELECT t.user_id, t.vm_id, t.multi_use, p.parameters"
            " FROM user_tokens t"
            " LEFT JOIN user_auth_parameters p ON p.id = t.auth_params_id"
            " WHERE t.token = %s AND t.expiration > %s",
            (token, int(now)))
        rows = fetch_dicts(cursor)
        if not rows:
            return None
        row = rows[0]
        if not row["multi_use"]:
            await cursor.execute("DELETE FROM user_tokens WHERE token = %s", (token,))
        params = row["parameters"] if isinstance(row["parameters"], dict) else {}
        return RedeemedToken(row["user_id"], row["vm_id"], row["multi_use"],
                             {str(k): _text(v) for k, v in params.items()})
    return db.transaction(interaction)
