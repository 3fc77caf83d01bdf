"""Relay transports (IMAP, Maildir), message parts and the outbox ledger."""
