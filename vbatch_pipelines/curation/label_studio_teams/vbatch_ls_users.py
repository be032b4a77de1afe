"""PATCH /api/users/<id> (users/api.py UserAPI, users/serializers.py BaseUserSerializerUpdate) lets any member write
any org-mate's (or its own) active_organization, i.e. jump into another organization: make it read-only."""
from users.serializers import BaseUserSerializerUpdate


class UserSerializerUpdate(BaseUserSerializerUpdate):
    class Meta(BaseUserSerializerUpdate.Meta):
        read_only_fields = ('email', 'active_organization')
