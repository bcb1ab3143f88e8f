"""The edge: what a proxy at the front does before any upstream sees a request
(rate limits and in-flight caps; TLS termination and access rules)."""
