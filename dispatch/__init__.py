"""Sending results to the PACS: the durable outbox and its C-STORE client."""
