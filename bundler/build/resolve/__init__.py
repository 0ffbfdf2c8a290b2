"""Resolvers: one module per artifact kind. Each turns profile entries into cached files."""
