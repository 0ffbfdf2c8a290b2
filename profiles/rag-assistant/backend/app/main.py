"""Seed 004's backend in miniature: users in SQLite (DATABASE_URL=sqlite:///...), answers
cached in Redis, the built frontend served as static files."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

DB_PATH = "/" + os.environ["DATABASE_URL"].split(":///", 1)[1].lstrip("/")
cache = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=2)
app = FastAPI()


def db() -> sqlite3.Connection:
    return sqlite3.connect(DB_PATH, timeout=5)


@app.get("/health")
def health() -> dict[str, Any]:
    with db() as conn:
        users = conn.execute("SELECT count(*) FROM users").fetchone()[0]
    cache.ping()
    return {"status": "ok", "env": os.environ.get("APP_ENV"), "users": users}


@app.get("/api/answer")
def answer(q: str) -> dict[str, Any]:
    key = f"answer:{q}"
    hit = cache.get(key)
    if hit is not None:
        return {"answer": hit.decode(), "cached": True}
    text = f"echo: {q}"
    cache.set(key, text, ex=3600)
    return {"answer": text, "cached": False}


_dist = Path(__file__).resolve().parents[2] / "www"
if _dist.is_dir():
    app.mount("/", StaticFiles(directory=_dist, html=True), name="frontend")
