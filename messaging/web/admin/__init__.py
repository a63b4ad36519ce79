"""Django admin as an audit tool: the history is shown, never edited, and stays fast however long it grows.

Importing this package registers every model's page (MessagingConfig.ready() does). Deletion
happens only through retention (`manage.py prune`). Lists never count the whole table
(CappedCountPaginator, `show_full_result_count = False`), filters are index-backed (no
`SELECT DISTINCT` of a column to build choices), search is by exact values, and the per-message
delivery figures are correlated subqueries on the (message, queue, status) index.
"""
from messaging.web.admin import deliveries, messages, streams, tokens, workers  # noqa: F401  (each registers its model)
