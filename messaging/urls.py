from django.urls import path

from messaging import api, operations, queues, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("publish/", views.publish, name="publish"),
    path("messages/", views.message_list, name="message-list"),
    # Before the letter's page: <path:...> would take ".../republish" as part of the message_id.
    path("messages/<path:message_id>/republish/", views.republish, name="message-republish"),
    path("messages/<path:message_id>/", views.message_detail, name="message-detail"),
    path("api/messages/", api.messages, name="api-messages"),
    path("api/messages/<path:message_id>/", api.message, name="api-message"),
    path("queues/", queues.queues, name="queues"),
    path("healthz", operations.healthz, name="healthz"),
    path("metrics", operations.metrics, name="metrics"),
]
