"""Thin click commands: parse options, call one function, render the result."""
