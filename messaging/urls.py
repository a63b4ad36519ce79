from django.urls import path

from messaging import operations, queues, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("publish/", views.publish, name="publish"),
    path("messages/", views.message_list, name="message-list"),
    path("messages/<path:message_id>/", views.message_detail, name="message-detail"),
    path("queues/", queues.queues, name="queues"),
    path("healthz", operations.healthz, name="healthz"),
    path("metrics", operations.metrics, name="metrics"),
]
