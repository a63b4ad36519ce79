"""The read-only admin every history list builds on: never edited, never fully counted, never a 500."""
from __future__ import annotations

import logging
from datetime import timedelta

from django.contrib import admin
from django.contrib import messages as flash
from django.contrib.admin import helpers
from django.contrib.admin.options import IncorrectLookupParameters
from django.db import models
from django.db.models import Max, Min
from django.http import HttpResponseRedirect
from django.utils import timezone
from django.utils.html import format_html

from messaging.web.counting import CappedCountPaginator
from messaging.web.display import pretty_json, shown_time

logger = logging.getLogger(__name__)


class SelectionChecked:
    """An admin whose actions refuse a selection that is not ids (anything else failed in `pk__in`: a 500)."""

    def response_action(self, request, queryset, **kwargs):
        selected = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
        if not all(value.isascii() and value.isdigit() and int(value) < 2**63 for value in selected):
            self.message_user(request, "The selection is not a list of rows of this page.", flash.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        return super().response_action(request, queryset, **kwargs)


class ReadOnly:
    """History: viewable by whoever has the view permission, never added, changed or deleted here."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ReadOnlyAdmin(ReadOnly, SelectionChecked, admin.ModelAdmin):
    """A read-only model page whose lists never count the whole table."""

    paginator = CappedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # a count per filter choice is a scan of the table each
    list_per_page = 50

    def get_changelist_instance(self, request):
        # Django's date hierarchy builds its range without a check: ?created_at__year=9999 raised
        # ValueError (the year 10000), with &created_at__month=12 OverflowError — a 500. Bad lookup
        # parameters are Django's own "?e=1" page instead, as for any other.
        try:
            return super().get_changelist_instance(request)
        except (ValueError, OverflowError) as exc:
            logger.warning("admin list %s: lookup parameters refused (%s: %s)", request.path,
                           exc.__class__.__name__, exc)
            raise IncorrectLookupParameters(exc) from exc


class CalendarQuerySet(models.QuerySet):
    """A queryset for the admin's date hierarchy that never reads every matching row.

    The hierarchy asks for `SELECT DISTINCT date_trunc(...)` over the filtered rows, a full scan of
    a long history. Here the first and last matching row come from the index (every filter of
    these lists is index-backed or a short list of ids), and every period between them is offered.
    """

    def datetimes(self, field_name, kind, order="ASC", tzinfo=None):
        bounds = self.order_by().aggregate(first=Min(field_name), last=Max(field_name))
        if not bounds["first"]:
            return []
        first, last = (timezone.localtime(bounds[k]) for k in ("first", "last"))
        periods, current = [], first.replace(hour=0, minute=0, second=0, microsecond=0)
        if kind in ("month", "year"):
            current = current.replace(day=1)
        if kind == "year":
            current = current.replace(month=1)
        while current <= last:
            periods.append(current)
            if kind == "day":
                current = (current + timedelta(days=1)).replace(hour=0)
            elif kind == "month":
                current = current.replace(year=current.year + current.month // 12, month=current.month % 12 + 1)
            else:
                current = current.replace(year=current.year + 1)
        return periods

    dates = datetimes


def calendar(queryset) -> CalendarQuerySet:
    """`queryset` as a CalendarQuerySet, for the admin lists with a date hierarchy."""
    return CalendarQuerySet(model=queryset.model, query=queryset.query, using=queryset._db, hints=queryset._hints)


def timestamp(field: str, *, description: str = "", sortable: bool = False):
    """An admin column/field showing `field` to the second with its time zone (Django's format has neither)."""

    @admin.display(description=description or field.removesuffix("_at").replace("_", " "),
                   ordering=field if sortable else None)
    def show(self, obj):
        return shown_time(getattr(obj, field))
    return show


def json_block(field: str, *, description: str = ""):
    """An admin field showing the JSON of `field` indented and escaped (Django shows a one-line repr)."""

    @admin.display(description=description or field)
    def show(self, obj):
        return format_html('<pre class="json">{}</pre>', pretty_json(getattr(obj, field)))
    return show
