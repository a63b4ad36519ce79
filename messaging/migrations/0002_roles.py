"""The groups `publisher` and `auditor` with their permissions (see messaging/roles.py)."""
from django.db import migrations


def create_roles(apps, schema_editor):
    from messaging.roles import ensure_roles

    ensure_roles(apps=apps)


def delete_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=["publisher", "auditor"]).delete()


class Migration(migrations.Migration):

    dependencies = [
        ("messaging", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_roles, delete_roles)]
