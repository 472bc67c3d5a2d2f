"""Operations beside the request path: the admin port, metrics, the access log and worker processes."""
