"""A real OpenID Connect identity provider for tests: one-file Django + django-oauth-toolkit.

Subcommands (all take ``--db PATH``; state lives next to the SQLite file):

* ``init --issuer URL --client-id ID --client-secret SECRET --redirect-uri URI [...]``:
  migrate, create the RS256 signing key (``PATH.key.pem``) and the settings file
  (``PATH.json``: issuer, Django secret key), register a confidential
  authorization-code client (secret stored hashed, no consent page).
* ``serve --host H --port P``: migrate and serve with a threaded WSGI server until SIGTERM.
* ``user NAME [--password PW] [--groups g1,g2] [--email E]``: create or update a user;
  ``--groups`` sets the groups exactly ("" means none), omitted means unchanged.

Endpoints: ``/o/.well-known/openid-configuration``, ``/o/.well-known/jwks.json``,
``/o/authorize/``, ``/o/token/``, ``/o/userinfo/`` and the sign-in page ``/accounts/login/``.
The issuer is whatever ``init --issuer`` was given (conventionally ``http://HOST:PORT/o``).
Claims (id_token and userinfo): ``sub`` (scope openid), ``preferred_username`` and
``name`` (profile), ``email`` (email), ``groups`` (groups: the user's Django group names).
"""

from __future__ import annotations

import argparse
import functools
import json
import secrets
import signal
import sys
import threading
from pathlib import Path

import django
from django.conf import settings

LOGIN_TEMPLATE = """<!doctype html>
<html><head><title>Sign in</title></head><body>
<h1>Sign in</h1>
<form method="post">{% csrf_token %}
{{ form.non_field_errors }}
<p><label>Username <input type="text" name="username" value="{{ form.username.value|default:'' }}" autofocus></label></p>
<p><label>Password <input type="password" name="password"></label></p>
<input type="hidden" name="next" value="{{ next }}">
<button type="submit">Sign in</button>
</form></body></html>
"""

SCOPES = {
    "openid": "OpenID Connect",
    "profile": "Your name and username",
    "email": "Your email address",
    "groups": "Your groups",
}


def state_paths(db: Path) -> tuple[Path, Path]:
    """Return the settings file and the RSA key file that belong to ``db``."""
    return db.with_name(db.name + ".json"), db.with_name(db.name + ".key.pem")


def configure(db: Path) -> None:
    """Configure Django for the provider whose state lives at ``db`` and set it up."""
    config_path, key_path = state_paths(db)
    config = json.loads(config_path.read_text())
    settings.configure(
        DEBUG=False,
        SECRET_KEY=config["secret_key"],
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "oauth2_provider",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
        ],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(db),
                # The `user` subcommand writes while the server runs.
                "OPTIONS": {
                    "timeout": 30,
                    "transaction_mode": "IMMEDIATE",
                    "init_command": "PRAGMA journal_mode=WAL;",
                },
            }
        },
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "OPTIONS": {
                    "loaders": [
                        ("django.template.loaders.locmem.Loader", {"login.html": LOGIN_TEMPLATE}),
                        "django.template.loaders.app_directories.Loader",
                    ],
                },
            }
        ],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        USE_TZ=True,
        LOGIN_URL="/accounts/login/",
        SESSION_COOKIE_NAME="oidcsession",
        CSRF_COOKIE_NAME="oidccsrftoken",
        OAUTH2_PROVIDER={
            "OIDC_ENABLED": True,
            "OIDC_ISS_ENDPOINT": config["issuer"],
            "OIDC_RSA_PRIVATE_KEY": key_path.read_text(),
            "OAUTH2_VALIDATOR_CLASS": f"{__name__}.ClaimsValidator",
            "PKCE_REQUIRED": False,
            "ALLOWED_REDIRECT_URI_SCHEMES": ["http", "https"],
            "SCOPES": SCOPES,
            "DEFAULT_SCOPES": ["openid"],
        },
    )
    django.setup()


@functools.cache
def _claims_validator():
    """Build the validator class; DOT's validators import models, so only after setup."""
    from oauth2_provider.oauth2_validators import OAuth2Validator

    class ClaimsValidator(OAuth2Validator):
        """Adds profile, email and ``groups`` claims to the id_token and userinfo."""

        oidc_claim_scope = {**OAuth2Validator.oidc_claim_scope, "groups": "groups"}

        def get_additional_claims(self):
            """Request-agnostic form, so discovery lists these in ``claims_supported``."""
            return {
                "preferred_username": lambda r: r.user.username,
                "name": lambda r: r.user.get_full_name() or r.user.username,
                "email": lambda r: r.user.email,
                "groups": lambda r: sorted(r.user.groups.values_list("name", flat=True)),
            }

    return ClaimsValidator


@functools.cache
def _urlpatterns():
    """DOT under ``/o/`` and the sign-in page at ``/accounts/login/``."""
    from django.contrib.auth.views import LoginView
    from django.urls import include, path

    return [
        path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
        path("accounts/login/", LoginView.as_view(template_name="login.html"), name="login"),
    ]


def __getattr__(name):
    """Resolve ``OAUTH2_VALIDATOR_CLASS`` and ``ROOT_URLCONF``'s urlpatterns lazily (PEP 562)."""
    if name == "ClaimsValidator":
        return _claims_validator()
    if name == "urlpatterns":
        return _urlpatterns()
    raise AttributeError(name)


def migrate() -> None:
    """Apply migrations (a no-op when up to date)."""
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def cmd_init(args) -> None:
    """Write the state files, migrate and register the client."""
    config_path, key_path = state_paths(args.db)
    args.db.parent.mkdir(parents=True, exist_ok=True)
    if not key_path.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
    secret_key = json.loads(config_path.read_text())["secret_key"] if config_path.exists() else None
    config_path.write_text(json.dumps({"issuer": args.issuer, "secret_key": secret_key or secrets.token_urlsafe(50)}))
    configure(args.db)
    migrate()
    from oauth2_provider.models import Application

    app = Application.objects.filter(client_id=args.client_id).first() or Application(client_id=args.client_id)
    app.name = args.client_id
    app.client_secret = args.client_secret  # plaintext: hashed on save
    app.client_type = Application.CLIENT_CONFIDENTIAL
    app.authorization_grant_type = Application.GRANT_AUTHORIZATION_CODE
    app.redirect_uris = " ".join(args.redirect_uri)
    app.skip_authorization = True
    app.algorithm = Application.RS256_ALGORITHM
    app.save()


def cmd_user(args) -> None:
    """Create or update a user."""
    configure(args.db)
    from django.contrib.auth.models import Group, User

    user, _ = User.objects.get_or_create(username=args.name)
    if args.password is not None:
        user.set_password(args.password)
    if args.email is not None:
        user.email = args.email
    user.save()
    if args.groups is not None:
        names = [g.strip() for g in args.groups.split(",") if g.strip()]
        user.groups.set([Group.objects.get_or_create(name=n)[0] for n in names])


def cmd_serve(args) -> None:
    """Serve until SIGTERM/SIGINT, then shut down cleanly."""
    configure(args.db)
    migrate()
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    httpd = ThreadedWSGIServer((args.host, args.port), WSGIRequestHandler)
    httpd.set_app(WSGIHandler())

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return: call it off the main thread.
        threading.Thread(target=httpd.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init")
    p.add_argument("--issuer", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", required=True)
    p.add_argument("--redirect-uri", action="append", required=True)
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("serve")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("user")
    p.add_argument("name")
    p.add_argument("--password")
    p.add_argument("--groups", help="comma-separated; '' means none; omitted means unchanged")
    p.add_argument("--email")
    p.set_defaults(func=cmd_user)
    for p in sub.choices.values():
        p.add_argument("--db", type=lambda s: Path(s).resolve(), required=True)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
