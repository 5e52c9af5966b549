"""The HTTP layer: routes parse, call one function, and return."""
