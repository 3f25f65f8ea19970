"""Curation: corpus cleaning, PII redaction and deduplication (`kiln curate`)."""
