"""vbatch's teams in its Label Studio: an organization per vbatch project, with its own admin (whose API token
vbatch uses for that project's tasks) and its reviewers. Label Studio has no API for either (its organizations
API creates none, and an invite link only ever joins the first organization), so this runs with the Label Studio
virtualenv's python and the server's own environment, on its database, while it runs, as the ``label-studio``
CLI creates its first user. Secrets come on stdin as a JSON object (never in argv, which ``ps`` shows); each
command prints one JSON object.

    echo '{"token": HEX}' | python vbatch_ls_teams.py team --title T --email E      # an organization, its admin
    echo '{"password": P}' | python vbatch_ls_teams.py reviewer --org N --email E   # a reviewer of it only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def setup_django() -> None:
    """What label_studio/server.py's _setup_env does (its sys.path and settings), without migrating."""
    for name, value in (("SENTRY_DSN", ""), ("FRONTEND_SENTRY_DSN", ""), ("LATEST_VERSION_CHECK", "false")):
        os.environ.setdefault(name, value)
    import label_studio

    sys.path.insert(0, str(Path(label_studio.__file__).parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "vbatch_ls_settings")
    import django

    django.setup()


def _user(email: str, password: str | None, token: str | None):
    """The user with this email, created if missing; its password and legacy API token set when given."""
    from rest_framework.authtoken.models import Token
    from users.models import User

    user = User.objects.filter(email=email).first()
    if user is None:
        user = User.objects.create_user(email=email, password=password)  # its Token comes from post_save
        user.username = email.split("@")[0]
        user.save(update_fields=["username"])
    elif password:
        user.set_password(password)
        user.save(update_fields=["password"])
    if token:
        Token.objects.filter(user=user).delete()
        Token.objects.create(user=user, key=token)
    return user


def _login_lands_in_live_membership(user) -> None:
    """Login makes the user's first membership (by pk) its active organization, removed or not: re-create its
    removed memberships after its live one."""
    from django.utils import timezone
    from organizations.models import OrganizationMember

    live = OrganizationMember.objects.filter(user=user, deleted_at__isnull=True).order_by("pk").first()
    if live is None:
        return
    for member in OrganizationMember.objects.filter(user=user, deleted_at__isnull=False, pk__lt=live.pk):
        organization = member.organization_id
        member.delete()
        OrganizationMember.objects.create(user=user, organization_id=organization, deleted_at=timezone.now())


def team(args) -> dict:
    """The organization whose admin is ``email`` (made the first time), its legacy API tokens on."""
    from django.db import transaction
    from organizations.models import Organization

    with transaction.atomic():
        admin = _user(args.email, None, args.secrets["token"])
        organization = Organization.objects.filter(created_by=admin).first()  # created_by is one-to-one
        if organization is None:
            organization = Organization.create_organization(created_by=admin, title=args.title,
                                                            legacy_api_tokens_enabled=True)
        organization.jwt.legacy_api_tokens_enabled = True  # `Authorization: Token ...`
        organization.jwt.save()
        admin.active_organization = organization
        admin.save(update_fields=["active_organization"])
    return {"org_id": organization.id, "title": organization.title, "email": admin.email,
            "token": admin.get_token().key}


def reviewer(args) -> dict:
    """Make ``email`` a member of organization ``org`` and of no other (someone who signed up through the first
    organization's link is moved); its password set when given."""
    from django.db import transaction
    from organizations.models import Organization, OrganizationMember
    from users.models import User

    with transaction.atomic():
        organization = Organization.objects.get(pk=args.org)
        if args.only_new and User.objects.filter(email=args.email).exists():
            return {"exists": True, "email": args.email}  # someone else's account: left as it is
        user = _user(args.email, args.secrets.get("password"), None)
        OrganizationMember.objects.filter(user=user, deleted_at__isnull=True).exclude(
            organization=organization).delete()
        member, _ = OrganizationMember.objects.get_or_create(user=user, organization=organization)
        if member.deleted_at is not None:
            member.deleted_at = None
            member.save(update_fields=["deleted_at"])
        user.active_organization = organization
        user.save(update_fields=["active_organization"])
        _login_lands_in_live_membership(user)
    return {"exists": False, "org_id": organization.id, "user_id": user.id, "email": user.email}


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("team")
    made.add_argument("--title", required=True)
    made.add_argument("--email", required=True)
    made.set_defaults(func=team)
    member = commands.add_parser("reviewer")
    member.add_argument("--org", type=int, required=True)
    member.add_argument("--email", required=True)
    member.add_argument("--only-new", action="store_true", help="change nothing when the account exists")
    member.set_defaults(func=reviewer)
    args = parser.parse_args()
    args.secrets = json.loads(sys.stdin.read() or "{}")
    setup_django()
    print(json.dumps(args.func(args)))


if __name__ == "__main__":
    main()
