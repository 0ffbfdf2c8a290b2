"""Seed 001's backend in miniature: the admin metrics API, an APScheduler collector, pandas
for aggregation and reportlab for PDF export, on PostgreSQL through SQLAlchemy."""

from __future__ import annotations

import io
import os
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import FastAPI
from fastapi.responses import Response
from reportlab.pdfgen import canvas
from sqlalchemy import create_engine, text


def _url() -> str:
    url = os.environ["DATABASE_URL"]
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


engine = create_engine(_url(), pool_pre_ping=True)
scheduler = BackgroundScheduler(timezone="UTC")


def collect(granularity: str = "hourly") -> None:
    with engine.begin() as conn:
        users = conn.execute(text("SELECT count(*) FROM metric_snapshots")).scalar_one()
        conn.execute(text("INSERT INTO metric_snapshots (metric_type, value, granularity, "
                          "collected_at) VALUES ('snapshots', :v, :g, now())"),
                     {"v": users, "g": granularity})


@asynccontextmanager
async def lifespan(_app: FastAPI) -> Any:
    collect()  # the guide's "first collection"; the scheduler takes it from there
    scheduler.add_job(collect, "cron", minute=0)
    scheduler.start()
    print("Metrics scheduler started", flush=True)
    yield
    scheduler.shutdown(wait=False)


app = FastAPI(lifespan=lifespan)


@app.get("/api/v1/metrics/status")
def status() -> dict[str, Any]:
    with engine.connect() as conn:
        last = conn.execute(text("SELECT max(collected_at) FROM metric_snapshots")).scalar_one()
        failures = conn.execute(text(
            "SELECT count(*) FROM metric_collection_failures "
            "WHERE failed_at > now() - interval '24 hours'")).scalar_one()
    job = scheduler.get_jobs()[0] if scheduler.get_jobs() else None
    return {"last_collection_at": last.isoformat() if last else None,
            "next_collection_at": job.next_run_time.isoformat() if job else None,
            "recent_failures": [], "failure_count_24h": failures,
            "status": "healthy" if scheduler.running and last else "degraded"}


@app.get("/api/v1/metrics/current")
def current() -> dict[str, Any]:
    with engine.connect() as conn:
        frame = pd.read_sql(text("SELECT metric_type, value FROM metric_snapshots"), conn)
    totals = frame.groupby("metric_type")["value"].sum().to_dict() if len(frame) else {}
    return {"at": datetime.now(UTC).isoformat(), "totals": totals}


@app.get("/api/v1/metrics/export.pdf")
def export_pdf() -> Response:
    buf = io.BytesIO()
    pdf = canvas.Canvas(buf)
    pdf.drawString(72, 720, f"Metrics export {datetime.now(UTC):%Y-%m-%d %H:%M}")
    pdf.save()
    return Response(buf.getvalue(), media_type="application/pdf")
