"""`{% message_url "message-detail" message_id %}`: a link to a message that works for any message_id."""
from django import template

from messaging.web import links

register = template.Library()


@register.simple_tag
def message_url(name: str, message_id: str) -> str:
    """The path of URL `name` for `message_id` (messaging.web.links.message_url)."""
    return links.message_url(name, message_id)
