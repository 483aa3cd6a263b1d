"""`turbo-trt live`: a WebSocket server (Starlette + uvicorn) and a web page for real-time use: camera frames
restyled as they come, a new image as a prompt is typed. Run-stage code: no torch. Needs the `live` extra.

    from turbo_trt.runner.live.server import LiveOptions, serve
    serve(LiveOptions(engines=Path("engines/sd-turbo")), print)

The protocol is in `protocol.py` and README ("Live"); the page is `static/` (plain HTML/JS/CSS, no CDN).
"""
