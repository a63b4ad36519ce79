"""The `messaging` app: Mailroom's models, pages, admin and commands."""
from django.apps import AppConfig


class MessagingConfig(AppConfig):
    name = "messaging"
    label = "messaging"
    verbose_name = "Mailroom"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from messaging import conf  # noqa: F401  (registers the system checks)
        from messaging.amqp.codec import install_header_decoding
        from messaging.web import admin  # noqa: F401  (registers the admin pages)

        install_header_decoding()
