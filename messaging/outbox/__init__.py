"""The outbox: validate a message, write it pending, publish it after commit, relay what stays pending."""
