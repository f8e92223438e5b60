"""The reference for the receiver benchmark: a bare Starlette endpoint that reads the body
and answers 202, served by uvicorn with the receiver's own settings (`uvicorn_config`)."""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from worker.intake.receiver import WEBHOOK_PATH
from worker.platform.serving import uvicorn_config


async def accept(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"status": "accepted"}, status_code=202)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = Starlette(routes=[Route(WEBHOOK_PATH, accept, methods=["POST"])])
    config = uvicorn_config(app, host="127.0.0.1", port=args.port)
    config.lifespan = "off"
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
