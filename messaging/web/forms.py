"""The publish form: everything the RabbitMQ management UI's form has, validated before anything is written."""
from __future__ import annotations

import json

from django import forms

from messaging.amqp.codec import EXCHANGE_TYPES, MAX_SHORTSTR_BYTES
from messaging.errors import InvalidMessage
from messaging.outbox.requests import MAX_WAIT_SECONDS
from messaging.outbox.validation import (
    PROPERTY_FIELDS,
    clean_properties,
    decode_body,
    validate_message,
)

HEADER_ROWS = 4
HEADER_TYPES = [("string", "String"), ("number", "Number"), ("boolean", "Boolean"), ("list", "List (JSON)")]


def typed_header(name: str, kind: str, text: str):
    """A header value from the form's text and type (as the management UI's header rows)."""
    if kind == "number":
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                raise forms.ValidationError(f"Header {name!r}: {text!r} is not a number.") from None
    if kind == "boolean":
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise forms.ValidationError(f"Header {name!r}: a boolean is true or false.")
        return lowered in ("true", "1", "yes")
    if kind == "list":
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise forms.ValidationError(f"Header {name!r}: the list is not valid JSON: {exc}") from exc
        if not isinstance(value, list):
            raise forms.ValidationError(f"Header {name!r}: a list is written as a JSON array, e.g. [1, \"a\"].")
        return value
    return text


class PublishForm(forms.Form):
    MODE_QUEUE = "queue"
    MODE_EXCHANGE = "exchange"

    mode = forms.ChoiceField(
        choices=[(MODE_QUEUE, "To a queue (default exchange)"), (MODE_EXCHANGE, "To an exchange")],
        initial=MODE_QUEUE, widget=forms.RadioSelect,
    )
    queue = forms.CharField(required=False, max_length=1000, help_text="Queue mode: the routing key is the queue name.")
    exchange = forms.CharField(
        required=False, max_length=1000,
        help_text="Existing amq.* exchanges (amq.direct, amq.topic…) can be published to but not declared.",
    )
    exchange_type = forms.ChoiceField(choices=[(t, t) for t in EXCHANGE_TYPES], initial="direct", required=False)
    routing_key = forms.CharField(required=False, max_length=1000, help_text="Exchange mode: the routing key.")
    declare = forms.BooleanField(
        required=False, initial=True, label="Declare the queue/exchange if missing",
        help_text="Durable when MAILROOM_DURABLE is set; an existing one is used as it is, whatever its arguments.",
    )
    body = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 6}), strip=False, label="Payload")
    body_encoding = forms.ChoiceField(
        choices=[("string", "Text (UTF-8)"), ("base64", "Base64 (binary bodies)")], initial="string", required=False,
        label="Payload encoding",
    )
    headers = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 3}),
        help_text='JSON object, e.g. {"x-trace": "abc", "attempt": 1, "retry": true, "tags": ["a", "b"]}',
    )
    persistent = forms.BooleanField(required=False, initial=True, label="Persistent (delivery mode 2)")
    content_type = forms.CharField(required=False, initial="text/plain", max_length=1000)
    content_encoding = forms.CharField(required=False, max_length=1000)
    priority = forms.IntegerField(required=False, min_value=0, max_value=255)
    correlation_id = forms.CharField(required=False, max_length=1000)
    reply_to = forms.CharField(required=False, max_length=1000)
    expiration = forms.CharField(required=False, max_length=20, help_text="Per-message TTL in milliseconds.")
    message_id = forms.CharField(required=False, max_length=1000, help_text="Empty: a UUID is generated.")
    timestamp = forms.IntegerField(required=False, min_value=0, help_text="Seconds since 1970 (UTC).")
    type = forms.CharField(required=False, max_length=1000)
    user_id = forms.CharField(
        required=False, max_length=1000,
        help_text="RabbitMQ refuses a user_id other than the connection's user (the letter is then failed).",
    )
    app_id = forms.CharField(required=False, max_length=1000)
    wait_reply = forms.FloatField(
        required=False, min_value=0.001, max_value=MAX_WAIT_SECONDS, label="Wait for a reply (seconds)",
        widget=forms.NumberInput(attrs={"step": "any"}),
        help_text="Request/reply (RabbitMQ tutorial 6): publish with reply_to (direct reply-to when reply_to is empty) "
                  "and a correlation_id, and show the reply under the letter. Empty: do not wait.",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for row in range(HEADER_ROWS):
            self.fields[f"header_name_{row}"] = forms.CharField(required=False, max_length=1000, label="Header")
            self.fields[f"header_type_{row}"] = forms.ChoiceField(choices=HEADER_TYPES, required=False, label="type")
            self.fields[f"header_value_{row}"] = forms.CharField(required=False, strip=False, label="value")

    def header_rows(self):
        return [(self[f"header_name_{r}"], self[f"header_type_{r}"], self[f"header_value_{r}"]) for r in range(HEADER_ROWS)]

    def property_fields(self):
        return [self[name] for name in ("content_type", "content_encoding", "priority", "correlation_id", "reply_to",
                                        "expiration", "message_id", "timestamp", "type", "user_id", "app_id")]

    def clean_headers(self) -> dict:
        text = self.cleaned_data["headers"].strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise forms.ValidationError(f"Headers are not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise forms.ValidationError("Headers must be a JSON object.")
        return value

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        headers = dict(data.get("headers") or {})
        for row in range(HEADER_ROWS):
            name = data.get(f"header_name_{row}", "")
            if name:
                try:
                    headers[name] = typed_header(name, data.get(f"header_type_{row}") or "string",
                                                 data.get(f"header_value_{row}", ""))
                except forms.ValidationError as exc:
                    self.add_error(f"header_value_{row}", exc)
        data["headers"] = headers
        if data["mode"] == self.MODE_QUEUE:
            if not data.get("queue"):
                self.add_error("queue", "Name the queue.")
                return data
            data.update(exchange="", exchange_type="", routing_key=data["queue"])
        elif not data.get("exchange"):
            self.add_error("exchange", "Name the exchange.")
            return data
        try:
            data["body_bytes"] = decode_body(data.get("body", ""), encoding=data.get("body_encoding") or "string")
            data["properties"] = clean_properties({name: data.get(name) for name in PROPERTY_FIELDS})
            validate_message(
                exchange=data["exchange"], routing_key=data["routing_key"], body=data["body_bytes"],
                headers=headers, exchange_type=data["exchange_type"] if data["declare"] else "",
            )
            for name in ("content_type", "content_encoding", "correlation_id", "message_id"):
                if len(data.get(name, "").encode("utf-8")) > MAX_SHORTSTR_BYTES:
                    self.add_error(name, f"Longer than {MAX_SHORTSTR_BYTES} bytes (UTF-8).")
        except InvalidMessage as exc:
            raise forms.ValidationError(str(exc)) from exc
        return data

    def message_kwargs(self) -> dict:
        """Keyword arguments for `create_message`."""
        d = self.cleaned_data
        return {
            "exchange": d["exchange"], "exchange_type": d["exchange_type"], "declare": d["declare"],
            "routing_key": d["routing_key"], "body": d["body_bytes"], "content_type": d["content_type"],
            "content_encoding": d["content_encoding"], "correlation_id": d["correlation_id"],
            "message_id": d["message_id"], "headers": d["headers"], "properties": d["properties"],
            "delivery_mode": 2 if d["persistent"] else 1,
        }
