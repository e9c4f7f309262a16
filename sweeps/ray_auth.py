"""Token authentication for the local Ray that sdsweep starts (``sweeps.ray_setup.ensure_ray``).

What Ray 2.60 does (``ray/_private/worker.py`` ``init``, ``ray/_private/authentication/
authentication_token_setup.py``): when ``ray.init`` *starts* a Ray (``address="local"``) and
``RAY_AUTH_MODE`` is unset, ``enable_token_auth_by_default`` sets ``RAY_AUTH_MODE=token`` for the
process and its children and logs the WARNING "Token authentication is enabled for this Ray
cluster. Set RAY_AUTH_MODE=disabled to opt out ..." -- the first line a newcomer saw from
``sdsweep run``. ``ensure_token_if_auth_enabled`` then takes the token from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` and, when there is none, generates one into
``~/.ray/auth_token``. When ``RAY_AUTH_MODE`` is set, Ray respects it and prints nothing.

What the token is for: with token mode on, the GCS, the raylets and the dashboard refuse every
request that does not carry it. A local Ray listens on all interfaces (checked: the GCS and raylet
ports are bound to ``*``), so without it anyone who can reach this machine could submit tasks --
run code as this user and read the sweep's data. (A second driver with a wrong token, or with
auth disabled, was refused by sdsweep's local Ray; one with the token joined.)

So sdsweep keeps authentication on and says so itself: it sets ``RAY_AUTH_MODE=token`` before
starting its local Ray, exactly the step Ray takes by default (``_enable_token_auth``: the
variable, then a refresh of Ray's cached config, which is read when ``ray`` is imported), minus the
warning that the default changed. The token comes from where Ray documents it (above), the same
token Ray's own default would use. A ``RAY_AUTH_MODE`` the user set (``token`` or ``disabled``) is
left as it is. Joining a cluster (``--address``, ``ray_address``, ``RAY_ADDRESS``) never comes
here: its auth stays Ray's own (an explicit address turns nothing on; set ``RAY_AUTH_MODE=token``
and the token to join a cluster that requires one).
"""

from __future__ import annotations

import os

AUTH_MODE = "RAY_AUTH_MODE"


def token_auth_for_local_ray() -> None:
    """Turn Ray's token authentication on explicitly for the local Ray about to be started (the
    module docstring says why), unless ``RAY_AUTH_MODE`` already says what the user wants."""
    if os.environ.get(AUTH_MODE) is not None:
        return
    # Ray's own step for a new local cluster, without its "default changed" notice: sets
    # RAY_AUTH_MODE=token and refreshes the config Ray cached at import.
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
