"""``ctsam3d serve``: CT-SAM3D on one (GPU) machine for many clients, over HTTP.

- ``app``: the FastAPI application (``create_app``): its routes, what each takes and does.
- ``host``: the server's state and the work behind the routes (authorisation, bounded bodies, the
  sessions' jobs with their memory reservations, uploads); ``refusals``: the error answers.
- ``request_bodies``: the JSON bodies as pydantic models; ``parsing``: ``ApiError`` and the checks of
  paths, headers and geometry.
- ``background``: ``BackgroundServer`` (uvicorn on a thread of this process).
- ``registry``: the sessions, their expiry, and the one worker thread that runs the network for all of
  them, fairly.
- ``metrics``: counters and histograms in Prometheus' text format, and the middleware that times requests.
- ``bounds``: what one request may make the server do (geometry, patches, clicks, connections).
- ``budget``: the memory budget (``--max-memory-mb``); ``images``: uploads and the images sessions share;
  ``upload``: arrays inflated while they stream in.
- ``connections``: uvicorn with header and body deadlines and a connection limit; ``logs``: rate-limited
  logging; ``browsers``: a tokenless server's checks against web pages; ``disconnects``: dropping the
  work of clients that hung up.
- ``web``: the browser client at ``/`` (built from the repository's ``web/``), with its Content-Security-Policy.

The wire format both ends share is ``CTSAM3DLib.protocol`` (numpy and the standard library only), so that
the client, ``CTSAM3DLib.remote.RemoteSession``, needs nothing of this package and runs without torch.
Nothing here is imported by ``CTSAM3DLib`` itself: FastAPI and uvicorn are an optional extra
(``pip install "ctsam3d[server]"``).
"""
