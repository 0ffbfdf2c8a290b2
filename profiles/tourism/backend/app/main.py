"""The tourism RAG backend (seed 003): FastAPI under uvicorn with 4 workers. Vectors live in
PostgreSQL (pgvector), chat history in MariaDB, answers are cached in Redis; `/health` checks
all three, `/metrics` is Prometheus'. The embedding is a stand-in (a hash of the words): the
guide's model and OpenAI calls are outside what a test can reach."""

from __future__ import annotations

import hashlib
import json
import os

import psycopg
import pymysql
import redis
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel

app = FastAPI(title="tourism backend")
QUERIES = Counter("rag_queries_total", "RAG queries answered")
CACHE_HITS = Counter("cache_hits_total", "RAG answers served from Redis")
DIM = 8


def embed(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255 for b in digest[:DIM]]


def _pg() -> psycopg.Connection:
    return psycopg.connect(os.environ["VECTOR_DB_URL"], connect_timeout=3)


def _chat() -> pymysql.connections.Connection:
    return pymysql.connect(host=os.environ.get("MARIADB_HOST", "mariadb"),
                           user=os.environ["MARIADB_USER"],
                           password=os.environ["MARIADB_PASSWORD"],
                           database=os.environ["MARIADB_DATABASE"], connect_timeout=3)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://redis:6379/0"),
                                socket_timeout=3)


def _pg_ping() -> None:
    with _pg() as conn:
        conn.execute("SELECT 1")


def _chat_ping() -> None:
    conn = _chat()
    try:
        conn.ping()
    finally:
        conn.close()


@app.get("/health")
def health(response: Response) -> dict[str, object]:
    checks: dict[str, str] = {}
    for name, probe in (("postgres", _pg_ping), ("mariadb", _chat_ping),
                        ("redis", lambda: _redis().ping())):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - the check reports any failure
            checks[name] = type(exc).__name__
    ok = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ok else 503
    return {"status": "ok" if ok else "degraded", "version": os.environ.get("APP_VERSION", ""),
            "pid": os.getpid(), **checks}


@app.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class Query(BaseModel):
    query: str
    top_k: int = 5


@app.post("/rag/query")
def rag_query(q: Query) -> dict[str, object]:
    QUERIES.inc()
    cache = _redis()
    key = "rag:" + hashlib.sha256(f"{q.top_k}:{q.query}".encode()).hexdigest()
    hit = cache.get(key)
    if hit is not None:
        CACHE_HITS.inc()
        places = json.loads(hit)
    else:
        vec = "[" + ",".join(str(x) for x in embed(q.query)) + "]"
        with _pg() as conn:
            rows = conn.execute("SELECT name FROM places ORDER BY embedding <-> %s::vector "
                                "LIMIT %s", (vec, q.top_k)).fetchall()
        places = [r[0] for r in rows]
        cache.set(key, json.dumps(places), ex=300)
    chat = _chat()
    try:
        with chat.cursor() as cur:
            cur.execute("INSERT INTO chat_history (question, answer) VALUES (%s, %s)",
                        (q.query, json.dumps(places, ensure_ascii=False)))
        chat.commit()
    finally:
        chat.close()
    return {"query": q.query, "places": places, "cached": hit is not None}
