"""The live server's ASGI app (Starlette): the page, /health, /config and the WebSocket /ws.

Each WebSocket client gets a stream on the server's StreamPool: its own settings and newest-wins slot,
served round robin with the other clients' on the pool's pipelines. Frames are decoded and results
encoded in worker threads, so the event loop only moves bytes. A client that disconnects has its waiting
input dropped at once; an input of it already running finishes and is discarded.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..stream import KEEP, FrameFailedError, Stream, StreamClosedError, StreamInputError, StreamPool
from .protocol import FORMATS, JPEG_QUALITY, MessageError, decode_frame, encode_image, parse_settings

STATIC = Path(__file__).parent / "static"
#: Settings of a new client until it sends its own.
DEFAULTS: dict[str, Any] = {"prompt": "", "seed": 0, "steps": 2, "strength": 0.5, "similarity": None,
                            "format": "jpeg"}
#: Skips in a row the similarity filter allows before a frame runs anyway.
MAX_SKIP = 10
#: The page loads nothing from other origins; results are shown from blob: URLs.
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self' ws: wss:; "
       "style-src 'self'; script-src 'self'; frame-ancestors 'none'")


@dataclass
class LiveLimits:
    max_clients: int = 8
    max_message: int = 4 * 2**20


class LiveApp:
    def __init__(self, pool: StreamPool, limits: LiveLimits, executor: str = "") -> None:
        self.pool = pool
        self.limits = limits
        self.executor = executor
        self.clients = 0  # changed only on the event loop

    def asgi(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Mount, Route, WebSocketRoute
        from starlette.staticfiles import StaticFiles

        return Starlette(routes=[
            Route("/", self.page),
            Route("/health", self.health),
            Route("/config", self.config),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            WebSocketRoute("/ws", self.client),
        ])

    # -- HTTP -----------------------------------------------------------------------------------------------
    async def page(self, request: Any) -> Any:
        from starlette.responses import HTMLResponse

        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    async def health(self, request: Any) -> Any:
        """Answers once warm-up is done (the server binds its port only then)."""
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ready", "clients": self.clients, "max_clients": self.limits.max_clients,
                             "engines": len(self.pool.pipes), "executor": self.executor, "runs": self.pool.runs})

    async def config(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"width": self.pool.width, "height": self.pool.height,
                             "max_steps": int(self.pool.scheduler["max_steps"]), "img2img": self.pool.img2img,
                             "defaults": DEFAULTS, "formats": list(FORMATS), "jpeg_quality": JPEG_QUALITY,
                             "max_message": self.limits.max_message})

    # -- WebSocket ------------------------------------------------------------------------------------------
    async def client(self, websocket: Any) -> None:
        await websocket.accept()
        if self.clients >= self.limits.max_clients:
            await websocket.close(code=1013, reason=f"server busy: {self.clients} clients connected, the limit "
                                                    f"is {self.limits.max_clients} (--max-clients); try again later")
            return
        self.clients += 1
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        send_lock = asyncio.Lock()  # a result's JSON and image go out back to back
        stream = self.pool.stream(DEFAULTS["prompt"], steps=DEFAULTS["steps"], strength=DEFAULTS["strength"],
                                  seed=DEFAULTS["seed"], queue=1, similarity=DEFAULTS["similarity"],
                                  max_skip=MAX_SKIP, notify=lambda: loop.call_soon_threadsafe(wake.set))
        state = {"format": DEFAULTS["format"]}
        sender = asyncio.create_task(self._send_results(websocket, stream, wake, send_lock, state))
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                reply = await self._handle(message, stream, state)
                if reply is not None:
                    async with send_lock:
                        await websocket.send_text(json.dumps(reply))
        except Exception:  # the connection broke mid-send: the same as a disconnect
            pass
        finally:
            stream.close()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            self.clients -= 1

    async def _handle(self, message: dict[str, Any], stream: Stream, state: dict[str, str]) -> dict[str, Any] | None:
        text, data = message.get("text"), message.get("bytes")
        size = len(data) if data is not None else len((text or "").encode("utf-8"))
        if size > self.limits.max_message:
            return MessageError("message", f"message: {size} bytes is over the limit of {self.limits.max_message} "
                                           "(--max-message)").reply()
        try:
            if data is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._push_frame, stream, data)
                return None
            settings = parse_settings(text or "")
            stream.update(prompt=settings.get("prompt"), seed=settings.get("seed"), steps=settings.get("steps"),
                          strength=settings.get("strength"), similarity=settings.get("similarity", KEEP))
            if "format" in settings:
                state["format"] = settings["format"]
            if "prompt" in settings and stream.frames_in_flight == 0:
                stream.push(prompt=settings["prompt"])  # text-to-image
        except MessageError as exc:
            return exc.reply()
        except StreamInputError as exc:
            return {"error": str(exc), "field": exc.field}
        except StreamClosedError:
            return None
        return None

    @staticmethod
    def _push_frame(stream: Stream, data: bytes) -> None:
        image = decode_frame(data)
        try:
            stream.push(image)
        except StreamInputError as exc:
            raise MessageError("frame" if exc.field == "image" else exc.field, str(exc)) from None

    async def _send_results(self, websocket: Any, stream: Stream, wake: asyncio.Event, send_lock: asyncio.Lock,
                            state: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await wake.wait()
                wake.clear()
                while True:
                    try:
                        result = stream.get(timeout=0)
                    except FrameFailedError as exc:
                        async with send_lock:
                            await websocket.send_text(json.dumps({"error": str(exc), "field": "frame", "seq": exc.seq}))
                        continue
                    if result is None:
                        break
                    data = await loop.run_in_executor(None, encode_image, result.image, state["format"])
                    stats = stream.stats()
                    meta = {"seq": result.seq, "latency_ms": round(result.latency_s * 1e3, 3),
                            "skipped": result.skipped, "dropped": stats["dropped"], "fps": round(stats["fps"], 2)}
                    async with send_lock:
                        await websocket.send_text(json.dumps(meta))
                        await websocket.send_bytes(data)
        except (StreamClosedError, asyncio.CancelledError):
            return
        except Exception:  # the client is gone; the receive loop ends the connection
            return
