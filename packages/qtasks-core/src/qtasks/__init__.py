"""qtasks: a fast, reliable task queue built from replaceable components."""
