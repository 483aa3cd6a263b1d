"""The live server's ASGI app (Starlette): the page, /health, /config and the WebSocket /ws.

Each WebSocket client gets a stream on the server's StreamPool: its own settings and newest-wins slot,
served round robin with the other clients' on the pool's pipelines. Frames are decoded and results
encoded in worker threads, so the event loop only moves bytes. A client that disconnects has its waiting
input dropped at once; an input of it already running finishes and is discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..stream import KEEP, FrameFailedError, PoolBrokenError, Stream, StreamClosedError, StreamInputError, StreamPool
from .protocol import (
    CONTROLS,
    FORMATS,
    JPEG_QUALITY,
    MAX_PROMPT_CHARS,
    MessageError,
    decode_frame,
    encode_image,
    error_reply,
    parse_settings,
)

log = logging.getLogger("turbo_trt.live")

STATIC = Path(__file__).parent / "static"
#: Settings of a new client until it sends its own.
DEFAULTS: dict[str, Any] = {"prompt": "", "seed": 0, "steps": 2, "strength": 0.5, "similarity": None,
                            "format": "jpeg", "control": "none", "control_scale": 1.0}
#: The stream's name of a setting -> the protocol's.
LIVE_FIELDS = {"controlnet_conditioning_scale": "control_scale"}
#: Skips in a row the similarity filter allows before a frame runs anyway.
MAX_SKIP = 10


def disconnects() -> tuple[type[BaseException], ...]:
    """What a connection that went away raises on send: Starlette's WebSocketDisconnect, RuntimeError after
    a close, uvicorn's ClientDisconnected (an OSError)."""
    from starlette.websockets import WebSocketDisconnect

    return (WebSocketDisconnect, OSError, RuntimeError)

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
        self.disconnects = disconnects()

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
        """Answers once warm-up is done (the server binds its port only then); 503 once the pool is broken.
        `engines` counts the pipelines still serving, `retired` those whose executor broke."""
        from starlette.responses import JSONResponse

        pool = self.pool.health()
        status = "broken" if pool["broken"] else "ready"
        return JSONResponse({"status": status, "clients": self.clients, "max_clients": self.limits.max_clients,
                             "engines": pool["engines"], "retired": {str(k): v for k, v in pool["retired"].items()},
                             "broken": pool["broken"], "executor": self.executor, "runs": self.pool.runs},
                            status_code=503 if pool["broken"] else 200)

    async def config(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"width": self.pool.width, "height": self.pool.height,
                             "max_steps": int(self.pool.scheduler["max_steps"]), "img2img": self.pool.img2img,
                             "defaults": DEFAULTS, "formats": list(FORMATS), "jpeg_quality": JPEG_QUALITY,
                             "controlnets": self.pool.controlnets, "controls": list(CONTROLS),
                             "max_message": self.limits.max_message, "max_prompt_chars": MAX_PROMPT_CHARS})

    # -- WebSocket ------------------------------------------------------------------------------------------
    @staticmethod
    def same_origin(websocket: Any) -> bool:
        """A browser sends Origin: it must name this server (the Host it connected to), or any website open
        in the browser could drive the local server. Clients that send no Origin (programs) are let in."""
        origin = websocket.headers.get("origin")
        if origin is None:
            return True
        host = websocket.headers.get("host", "")
        return urlsplit(origin).netloc.lower() == host.lower() != ""

    async def client(self, websocket: Any) -> None:
        if not self.same_origin(websocket):
            log.warning("refused a WebSocket from origin %r (host %r)", websocket.headers.get("origin"),
                        websocket.headers.get("host"))
            await websocket.close(code=1008)  # before accept: the handshake is answered 403
            return
        await websocket.accept()
        if self.clients >= self.limits.max_clients:
            await websocket.close(code=1013, reason=f"server busy: {self.clients} clients connected, the limit "
                                                    f"is {self.limits.max_clients} (--max-clients); try again later")
            return
        counted = False
        stream: Stream | None = None
        sender: asyncio.Task[None] | None = None
        try:
            self.clients += 1
            counted = True
            loop = asyncio.get_running_loop()
            wake = asyncio.Event()
            send_lock = asyncio.Lock()  # a result's JSON and image go out back to back
            stream = self.pool.stream(DEFAULTS["prompt"], steps=DEFAULTS["steps"], strength=DEFAULTS["strength"],
                                      seed=DEFAULTS["seed"], queue=1, similarity=DEFAULTS["similarity"],
                                      max_skip=MAX_SKIP, notify=lambda: loop.call_soon_threadsafe(wake.set))
            state = {"format": DEFAULTS["format"]}
            sender = asyncio.create_task(self._send_results(websocket, stream, wake, send_lock, state))
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                reply = await self._handle(message, stream, state)
                if reply is not None:
                    async with send_lock:
                        await websocket.send_text(json.dumps(reply))
        except self.disconnects:  # the connection broke mid-send: the same as a disconnect
            pass
        except Exception:
            log.exception("unexpected error serving a WebSocket client; closing it")
            with contextlib.suppress(*self.disconnects):
                await websocket.close(code=1011, reason="internal server error (logged by the server)")
        finally:
            if stream is not None:
                stream.close()
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            if counted:
                self.clients -= 1

    async def _handle(self, message: dict[str, Any], stream: Stream, state: dict[str, str]) -> dict[str, Any] | None:
        text, data = message.get("text"), message.get("bytes")
        size = len(data) if data is not None else len((text or "").encode("utf-8"))
        is_input = data is not None
        if size > self.limits.max_message:
            return error_reply(f"message: {size} bytes is over the limit of {self.limits.max_message} "
                               "(--max-message)", "message", is_input)
        loop = asyncio.get_running_loop()
        try:
            if data is not None:
                await loop.run_in_executor(None, self._push_frame, stream, data)
                return None
            settings = parse_settings(text or "")
            is_input = settings.get("generate", False)
            control = settings.get("control", KEEP)
            stream.update(prompt=settings.get("prompt"), seed=settings.get("seed"), steps=settings.get("steps"),
                          strength=settings.get("strength"), similarity=settings.get("similarity", KEEP),
                          control=None if control == "none" else control,
                          controlnet_conditioning_scale=settings.get("control_scale"))
            if "format" in settings:
                state["format"] = settings["format"]
            if is_input:
                await loop.run_in_executor(None, stream.push)  # text-to-image (tokens and noise off the loop)
        except MessageError as exc:
            return exc.reply()
        except StreamInputError as exc:
            field = LIVE_FIELDS.get(exc.field, exc.field)
            return error_reply(str(exc).replace(exc.field, field), field, is_input)
        except (StreamClosedError, PoolBrokenError) as exc:
            return error_reply(f"the server cannot run inputs now ({exc})", "message", is_input)
        except Exception:
            log.exception("unexpected error handling a client message")
            return error_reply("internal server error (logged by the server)", "message", is_input)
        return None

    @staticmethod
    def _push_frame(stream: Stream, data: bytes) -> None:
        image = decode_frame(data)
        try:
            stream.push(image)
        except StreamInputError as exc:
            raise MessageError("frame" if exc.field == "image" else exc.field, str(exc), True) from None

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
                    except FrameFailedError as exc:  # the details stay in the server's log
                        log.error("the engines failed on frame %d of a client", exc.seq, exc_info=exc.__cause__)
                        reply = error_reply(f"the engines failed on frame {exc.seq} (details in the server log)",
                                            "frame", True, exc.seq)
                        async with send_lock:
                            await websocket.send_text(json.dumps(reply))
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
        except PoolBrokenError as exc:
            with contextlib.suppress(*self.disconnects):
                async with send_lock:
                    await websocket.send_text(json.dumps(error_reply(f"the server cannot run inputs now ({exc})",
                                                                     "message", False)))
        except self.disconnects:  # the client is gone; the receive loop ends the connection
            return
        except Exception:
            log.exception("unexpected error sending results to a client")
