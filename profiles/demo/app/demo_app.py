"""The demo web app: a tiny WSGI app, served on the target by waitress from the bundle."""

import json
import os

VERSION = os.environ.get("DEMO_VERSION", "dev")


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/health":
        body = json.dumps({"status": "ok", "version": VERSION}).encode()
        status, ctype = "200 OK", "application/json"
    elif path == "/":
        body = f"<h1>bundler demo</h1><p>release {VERSION}, installed offline</p>\n".encode()
        status, ctype = "200 OK", "text/html; charset=utf-8"
    else:
        body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]
