"""The AI server (FastAPI + RAG in the guide): answers its health check at `/` and keeps its
vector store under VECTOR_STORE_PATH (the `vector_store` named volume)."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

app = FastAPI(title="AI Server")
STORE = Path(os.environ.get("VECTOR_STORE_PATH", "/app/vector_store"))


@app.get("/")
def health() -> dict[str, str]:
    return {"status": "healthy", "service": "AI Server",
            "version": os.environ.get("APP_VERSION", "")}


@app.get("/store")
def store() -> dict[str, object]:
    """Proves the named volume: a marker written once survives every upgrade."""
    STORE.mkdir(parents=True, exist_ok=True)
    marker = STORE / "created-by"
    if not marker.exists():
        marker.write_text(os.environ.get("APP_VERSION", ""))
    return {"path": str(STORE), "created_by": marker.read_text()}
