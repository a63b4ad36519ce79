"""The publish form: everything the RabbitMQ management UI's form has, validated before anything is written."""
from __future__ import annotations

import json

from django import forms

from messaging import broker
from messaging.publishing import LetterError, validate_letter


class PublishForm(forms.Form):
    MODE_QUEUE = "queue"
    MODE_EXCHANGE = "exchange"

    mode = forms.ChoiceField(
        choices=[(MODE_QUEUE, "To a queue (default exchange)"), (MODE_EXCHANGE, "To an exchange")],
        initial=MODE_QUEUE, widget=forms.RadioSelect,
    )
    queue = forms.CharField(required=False, max_length=255, help_text="Queue mode: the routing key is the queue name.")
    exchange = forms.CharField(required=False, max_length=255)
    exchange_type = forms.ChoiceField(choices=[(t, t) for t in broker.EXCHANGE_TYPES], initial="direct", required=False)
    routing_key = forms.CharField(required=False, max_length=255, help_text="Exchange mode: the routing key.")
    declare = forms.BooleanField(
        required=False, initial=True, label="Declare the queue/exchange if missing",
        help_text="Durable; an existing one is used as it is, whatever its arguments.",
    )
    body = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 6}), strip=False)
    content_type = forms.CharField(required=False, initial="text/plain", max_length=255)
    headers = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 3}),
        help_text='JSON object, e.g. {"x-trace": "abc", "attempt": 1}',
    )
    persistent = forms.BooleanField(required=False, initial=True, label="Persistent (delivery mode 2)")

    def clean_headers(self) -> dict:
        text = self.cleaned_data["headers"].strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"Headers are not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise forms.ValidationError("Headers must be a JSON object.")
        return value

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        if data["mode"] == self.MODE_QUEUE:
            if not data.get("queue"):
                self.add_error("queue", "Name the queue.")
                return data
            data.update(exchange="", exchange_type="", routing_key=data["queue"])
        elif not data.get("exchange"):
            self.add_error("exchange", "Name the exchange.")
            return data
        data["body_bytes"] = data.get("body", "").encode("utf-8")
        try:
            validate_letter(
                exchange=data["exchange"], routing_key=data["routing_key"], body=data["body_bytes"],
                headers=data["headers"], exchange_type=data["exchange_type"] if data["declare"] else "",
            )
        except LetterError as exc:
            raise forms.ValidationError(str(exc)) from exc
        return data

    def letter_kwargs(self) -> dict:
        """Keyword arguments for `publishing.create_letter`."""
        d = self.cleaned_data
        return {
            "exchange": d["exchange"], "exchange_type": d["exchange_type"], "declare": d["declare"],
            "routing_key": d["routing_key"], "body": d["body_bytes"], "content_type": d["content_type"],
            "headers": d["headers"], "delivery_mode": 2 if d["persistent"] else 1,
        }
