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
