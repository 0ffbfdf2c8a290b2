"""`python -m app.serve`: uvicorn on 127.0.0.1:$PORT (the guide runs `uvicorn app.main:app
--workers 4`; the port comes from the release environment)."""

import os

import uvicorn

if __name__ == "__main__":
    uvicorn.run("app.main:app", host="127.0.0.1", port=int(os.environ.get("PORT", "8000")),
                workers=int(os.environ.get("WEB_CONCURRENCY", "2")))
