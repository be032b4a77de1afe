"""A DRF default permission for Label Studio Community (vbatch); imports nothing from Label Studio at load."""
from rest_framework.permissions import BasePermission


class ProjectParamInActiveOrg(BasePermission):
    # Views that take a project id from the query or body and fetch it unscoped (POST /api/tasks:
    # tasks/api.py:195-200) never run an object check: refuse a project outside the active organization.
    def has_permission(self, request, view):
        user = request.user
        if not getattr(user, 'is_authenticated', False):
            return True  # IsAuthenticated decides
        values = [request.query_params.get('project')]
        if request.method not in ('GET', 'HEAD', 'OPTIONS') and isinstance(request.data, dict):
            values.append(request.data.get('project'))
        from projects.models import Project

        for value in values:
            try:
                pid = int(value)
            except (TypeError, ValueError):
                continue
            if not Project.objects.filter(pk=pid, organization_id=user.active_organization_id).exists():
                return False
        return True
