"""Requests answered before any view."""
from __future__ import annotations

from django.http import JsonResponse


class RefuseNulInQuery:
    """A NUL in a query parameter is answered 400: no name, id or value Mailroom stores holds one,
    and PostgreSQL refuses one in a query — a 500 in every list that filters or searches by it,
    Django's own admin pages included. The answer is in the API's error shape, which a person reads too."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if any("\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists()):
            return JsonResponse({"detail": "A query parameter holds a NUL character.", "code": "invalid"}, status=400)
        return self.get_response(request)
