"""Label Studio's settings for vbatch's teams (DJANGO_SETTINGS_MODULE=vbatch_ls_settings, this directory on
PYTHONPATH; set by vbatch_pipelines/curation/server.py). Label Studio Community runs one organization and says so:
its object check lets any user of any organization at another's objects (projects/mixins.py, "cross-org access
does not exist by design"), and several views fetch objects unscoped. vbatch gives each of its projects an
organization, so it closes those holes here, through Label Studio's own pluggable settings, without changing a
file of Label Studio: an object must be in the user's active organization (PROJECT_MIXIN), a ``project`` named in
a query or body too (a default DRF permission), and a user cannot move itself into another organization
(USER_SERIALIZER_UPDATE). Checked against the pinned version by tests/test_label_studio_teams.py.
"""
import os

# label_studio.core.settings.label_studio reads django.conf.settings while it is being imported (sentry init):
# let that re-entrant read see Label Studio's own module, as it does without this wrapper.
os.environ['DJANGO_SETTINGS_MODULE'] = 'label_studio.core.settings.label_studio'
try:
    from label_studio.core.settings.label_studio import *  # noqa: F401,F403
finally:
    os.environ['DJANGO_SETTINGS_MODULE'] = __name__

PROJECT_MIXIN = 'vbatch_ls_guard.ProjectMixin'
USER_SERIALIZER_UPDATE = 'vbatch_ls_users.UserSerializerUpdate'

# DRF read REST_FRAMEWORK during the import above (rest_framework.views.APIView.permission_classes is bound at
# class creation): change the dict in place, drop DRF's cache, and rebind APIView's default.
REST_FRAMEWORK['DEFAULT_PERMISSION_CLASSES'] = [  # noqa: F405
    'vbatch_ls_perms.ProjectParamInActiveOrg', *REST_FRAMEWORK['DEFAULT_PERMISSION_CLASSES']]  # noqa: F405
import rest_framework.views  # noqa: E402
from rest_framework.settings import api_settings as _drf  # noqa: E402
from vbatch_ls_perms import ProjectParamInActiveOrg as _guard  # noqa: E402

_drf.reload()
if _guard not in rest_framework.views.APIView.permission_classes:
    rest_framework.views.APIView.permission_classes = [_guard, *rest_framework.views.APIView.permission_classes]

# SSRF protection on (issue 30): Label Studio fetches URLs its users give it (imports, ML backends, webhooks), so
# none may reach this machine's services or a private network, cloud metadata included. One address is let
# through: the one vbatch's API takes Label Studio's webhooks at (VBATCH_WEBHOOK_ADDRESS, 127.0.0.1: the API
# behind its own keys and drive-by guard). Label Studio's default banned list cannot make that exception, so the
# same reserved ranges (RFC 6890, as Label Studio lists them) are given here with that address cut out.
import ipaddress as _ip  # noqa: E402

_RESERVED = ('0.0.0.0/8', '10.0.0.0/8', '100.64.0.0/10', '127.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12',
             '192.0.0.0/24', '192.0.2.0/24', '192.88.99.0/24', '192.168.0.0/16', '198.18.0.0/15', '198.51.100.0/24',
             '203.0.113.0/24', '224.0.0.0/4', '233.252.0.0/24', '240.0.0.0/4', '255.255.255.255/32', '::/128',
             '::1/128', '::ffff:0:0/96', '::ffff:0:0:0/96', '64:ff9b::/96', '64:ff9b:1::/48', '100::/64',
             '2001:0000::/32', '2001:20::/28', '2001:db8::/32', '2002::/16', 'fc00::/7', 'fe80::/10', 'ff00::/8')
_WEBHOOK = _ip.ip_network(os.environ.get('VBATCH_WEBHOOK_ADDRESS', '127.0.0.1'))


def _banned(subnet: str) -> list:
    network = _ip.ip_network(subnet)
    if network.version == _WEBHOOK.version and _WEBHOOK.subnet_of(network):
        return [str(part) for part in network.address_exclude(_WEBHOOK)]
    return [subnet]


SSRF_PROTECTION_ENABLED = True
USE_DEFAULT_BANNED_SUBNETS = False
USER_ADDITIONAL_BANNED_SUBNETS = [part for subnet in _RESERVED for part in _banned(subnet)]
