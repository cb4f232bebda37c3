"""The HTTP layer: OCI and operator endpoints, middleware, the server and its drain."""
