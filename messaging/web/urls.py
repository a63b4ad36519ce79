"""The app's URLs: pages, the HTTP API, the broker view, health and metrics."""
from django.urls import path, register_converter

from messaging.web import deadletter_pages, health, queues, views
from messaging.web import replay as replay_views
from messaging.web.api import deadletters as api_deadletters
from messaging.web.api import views as api
from messaging.web.links import message_id_from_path


class MessageIdConverter:
    """A message_id in a path: any characters, slashes and newlines too (other producers choose
    them), but NUL, which no stored message_id holds (PostgreSQL refuses it in a query)."""

    # Links are made by messaging.web.links.message_url, which writes the id as one segment.
    regex = r"[^\x00]+"

    def to_python(self, value: str) -> str:
        return message_id_from_path(value)

    def to_url(self, value: str) -> str:
        return value


register_converter(MessageIdConverter, "message_id")
# `<queue:...>` (pages) is registered by messaging.web.links, which the admin's URLs use too.
# The API's paths take a queue's name as they take a message_id: percent-encoded once, as clients do.
register_converter(MessageIdConverter, "queue_name")

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("publish/", views.publish, name="publish"),
    path("messages/", views.message_list, name="message-list"),
    # Not under messages/: a message_id may end in "/republish" (any characters, slashes too).
    path("republish/<message_id:message_id>/", views.republish, name="message-republish"),
    path("messages/<message_id:message_id>/", views.message_detail, name="message-detail"),
    path("api/messages/", api.MessageList.as_view(), name="api-messages"),
    path("api/messages/<message_id:message_id>/", api.MessageDetail.as_view(), name="api-message"),
    path("api/openapi.json", api.SchemaView.as_view(), name="api-schema"),
    path("api/docs/", api.DocsView.as_view(), name="api-docs"),
    path("api/dead-letters/", api_deadletters.DeadLetterQueueList.as_view(), name="api-dead-letters"),
    path("api/dead-letters/<queue_name:queue>/", api_deadletters.DeadLetterQueueDetail.as_view(),
         name="api-dead-letter-queue"),
    path("queues/", queues.queues, name="queues"),
    path("queues/<queue:queue>/", queues.queue_detail, name="queue-detail"),
    path("dead-letters/", deadletter_pages.dead_letters, name="dead-letters"),
    # Before the other dead-letters/<queue>/ route (a name may end in "/replay", encoded in links anyway).
    path("dead-letters/<queue:queue>/replay/", replay_views.replay_dead_letters, name="dead-letter-replay"),
    path("dead-letters/<queue:queue>/", deadletter_pages.dead_letter_queue, name="dead-letter-queue"),
    path("healthz", health.healthz, name="healthz"),
    path("metrics", health.metrics, name="metrics"),
]
