"""One router per resource: encode, retrieve, items, health."""
