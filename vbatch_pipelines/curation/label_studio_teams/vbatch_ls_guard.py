"""Cross-organization object check for Label Studio Community (vbatch): settings.PROJECT_MIXIN."""
from projects.mixins import ProjectMixin as _CommunityProjectMixin


class ProjectMixin(_CommunityProjectMixin):
    # Community's version only refuses a soft-deleted member (projects/mixins.py:74-78): every object check
    # (Project, Task, Annotation, ... delegate here) also requires the user's active, live organization.
    def has_permission(self, user):
        user.project = self  # link for activity log, as upstream
        org_id = getattr(user, 'active_organization_id', None)
        return bool(self.organization_id) and self.organization_id == org_id and self.organization.has_permission(user)
