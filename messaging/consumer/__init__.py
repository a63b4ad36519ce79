"""The consume worker: receive deliveries, record them, commit, then ack; handlers and their retries."""
