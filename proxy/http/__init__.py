"""HTTP/1.1 both ways: the front that clients talk to and the pooled upstream client.

A small HTTP/1.1 library that happens to live here: it knows nothing of AWS,
routes or credentials, and imports nothing from the rest of the package.
"""
