"""The web console (Starlette + Jinja2, server-rendered), /metrics and DICOMweb STOW-RS of one node.

Pages read the index; the few actions (retry, cancel, C-ECHO) need a login or the admin
token and go through the same functions as the command line (jobs.retry).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .. import audit, metrics
from ..jobs import retry
from ..net.echo import echo_peer
from . import queries, stow, thumbnails
from .auth import SESSION_COOKIE, SESSION_SECONDS, Auth

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)
HERE = Path(__file__).parent


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f} ms" if value < 10_000 else f"{value / 1000:,.1f} s"


def _fmt_time(value) -> str:  # type: ignore[no-untyped-def]
    return value.strftime("%Y-%m-%d %H:%M:%S") + "Z" if value else "–"


def build_app(node: "Node") -> Starlette:
    settings = node.settings
    auth = Auth(settings.http)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["ms"] = _fmt_ms
    templates.env.filters["utc"] = _fmt_time
    templates.env.globals["node_ae"] = settings.node.ae_title
    metrics.watch_database(node.db, settings.node.storage_dir, settings.tls.certificate)

    def user_of(request: Request) -> str | None:
        return auth.user_from_bearer(request.headers.get("authorization")) or auth.user_from_cookie(
            request.cookies.get(SESSION_COOKIE))

    def page(request: Request, name: str, status_code: int = 200, **context) -> Response:  # type: ignore[no-untyped-def]
        context.setdefault("message", request.query_params.get("msg"))
        context.setdefault("error", request.query_params.get("err"))
        return templates.TemplateResponse(request, name, {"user": user_of(request), **context}, status_code=status_code)

    def back(request: Request, default: str, message: str = "", error: str = "") -> RedirectResponse:
        target = request.headers.get("referer") or default
        parsed = urllib.parse.urlsplit(target)
        query = [(k, v) for k, v in urllib.parse.parse_qsl(parsed.query) if k not in ("msg", "err")]
        query += [("msg", message)] if message else []
        query += [("err", error)] if error else []
        path = (parsed.path or default) + ("?" + urllib.parse.urlencode(query) if query else "")
        return RedirectResponse(path, status_code=303)

    def require_user(request: Request) -> str | Response:
        """The user, or the response that refuses the action."""
        origin = request.headers.get("origin")
        if origin and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
            return PlainTextResponse("cross-site request refused", status_code=403)
        if not auth.configured:
            return PlainTextResponse("no [http] users or admin_token configured: actions are disabled", status_code=403)
        user = user_of(request)
        if user:
            return user
        if "text/html" in request.headers.get("accept", ""):
            next_url = request.headers.get("referer") or "/"
            return RedirectResponse("/login?" + urllib.parse.urlencode({"next": next_url}), status_code=303)
        return PlainTextResponse("login or Authorization: Bearer <admin_token> required", status_code=401)

    # -- pages -----------------------------------------------------------------------------
    async def dashboard(request: Request) -> Response:
        data = await run_in_threadpool(queries.dashboard, node.db)
        return page(request, "dashboard.html", data=data, timeline=queries.TIMELINE)

    async def dashboard_live(request: Request) -> Response:
        data = await run_in_threadpool(queries.dashboard, node.db)
        return page(request, "_dashboard_live.html", data=data, timeline=queries.TIMELINE)

    async def series_page(request: Request) -> Response:
        uid = request.path_params["uid"]
        found = await run_in_threadpool(queries.series_detail, node.db, uid)
        if found is None:
            return page(request, "missing.html", status_code=404, what=f"series {uid}")
        series, instances, events = found
        decisions = await run_in_threadpool(_decisions, uid)
        return page(request, "series.html", series=series, instances=instances, events=events, decisions=decisions,
                    timeline=queries.TIMELINE)

    def _decisions(series_uid: str) -> list:  # type: ignore[type-arg]
        first = queries.first_instance(node.db, series_uid)
        if first is None:
            return []
        path, calling_ae = first
        return node.router.decide(pydicom.dcmread(node.files.absolute(path), stop_before_pixels=True), calling_ae)

    async def thumbnail(request: Request) -> Response:
        uid = request.path_params["uid"]
        side = request.path_params["side"]
        try:
            job_id = int(request.query_params.get("job", "0"))
        except ValueError:
            return PlainTextResponse("job must be a number", status_code=400)
        if side not in ("before", "after"):
            return PlainTextResponse("before or after", status_code=404)

        def render() -> bytes | None:
            paths = [node.files.absolute(p) for p in queries.instance_paths(node.db, uid)]
            if not paths:
                return None
            result_files: list[Path] = []
            if job_id:
                row = queries.job(node.db, job_id)
                if row is None or row.series_uid != uid:
                    return None
                folder = node.files.absolute(row.result_path) if row.result_path else node.files.result_dir(job_id)
                result_files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
            before, after = thumbnails.before_after(paths, result_files)
            return before if side == "before" else after

        png = await run_in_threadpool(render)
        if png is None:
            return PlainTextResponse("no image", status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def jobs_page(request: Request) -> Response:
        state = request.query_params.get("state") or None
        if state and state not in queries.JOB_STATES:
            state = None
        rows = await run_in_threadpool(queries.jobs, node.db, state)
        return page(request, "jobs.html", jobs=rows, state=state, states=queries.JOB_STATES)

    async def job_retry(request: Request) -> Response:
        user = require_user(request)
        if not isinstance(user, str):
            return user
        job_id = int(request.path_params["id"])
        try:
            message = await run_in_threadpool(retry, node.db, job_id)
        except (LookupError, ValueError) as exc:
            return back(request, "/jobs", error=str(exc))
        log.info("web: %s (by %s)", message, user)
        node.worker.wake.set()
        node.sender.wake.set()
        return back(request, "/jobs", message=message)

    async def job_cancel(request: Request) -> Response:
        user = require_user(request)
        if not isinstance(user, str):
            return user
        job_id = int(request.path_params["id"])
        try:
            message = await run_in_threadpool(queries.cancel, node.db, job_id, user)
        except (LookupError, ValueError) as exc:
            return back(request, "/jobs", error=str(exc))
        log.info("web: %s (by %s)", message, user)
        return back(request, "/jobs", message=message)

    async def rules_page(request: Request) -> Response:
        chosen = request.query_params.get("series") or ""
        series = await run_in_threadpool(queries.recent_series, node.db)
        decisions = await run_in_threadpool(_decisions, chosen) if chosen else None
        return page(request, "rules.html", rules=settings.rules, series=series, chosen=chosen, decisions=decisions,
                    global_webhook=bool(settings.notify.webhook_url))

    async def peers_page(request: Request) -> Response:
        last = await run_in_threadpool(queries.last_deliveries, node.db, [p.name for p in settings.peers])
        return page(request, "peers.html", peers=settings.peers, last=last)

    async def peer_echo(request: Request) -> Response:
        user = require_user(request)
        if not isinstance(user, str):
            return user
        peer = settings.peer_by_name(request.path_params["name"])
        if peer is None:
            return back(request, "/peers", error="no such peer")
        ok, message = await run_in_threadpool(echo_peer, settings, peer)
        audit.record(node.db, "echo", called_ae=peer.ae_title, detail=f"{message} (by {user})"[:2000])
        return back(request, "/peers", **({"message": message} if ok else {"error": message}))

    async def login_page(request: Request) -> Response:
        return page(request, "login.html", next=request.query_params.get("next", "/"), configured=auth.configured)

    async def login(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        next_url = str(form.get("next", "/"))
        if not next_url.startswith("/") or next_url.startswith("//"):
            next_url = urllib.parse.urlsplit(next_url).path or "/"
        user = await run_in_threadpool(auth.check_login, name, password)
        if user is None:
            log.warning("web: failed login for %r from %s", name[:32], request.client.host if request.client else "?")
            return page(request, "login.html", status_code=401, next=next_url, configured=auth.configured,
                        error="wrong user name or password")
        log.info("web: %s logged in from %s", user, request.client.host if request.client else "?")
        response = RedirectResponse(next_url, status_code=303)
        response.set_cookie(SESSION_COOKIE, auth.session_cookie(user), max_age=SESSION_SECONDS, httponly=True,
                            samesite="strict")
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # -- machine interfaces ----------------------------------------------------------------
    async def metrics_endpoint(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, metrics.REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        from ..check import node_health

        result = await run_in_threadpool(node_health, node)
        return JSONResponse(result, status_code=200 if result["status"] == "ok" else 503)

    async def stow_rs(request: Request) -> Response:
        address = request.client.host if request.client else ""
        peer = stow.peer_for_token(settings, request.headers.get("authorization"))
        if peer is None:
            log.warning("STOW-RS from %s refused: no or unknown bearer token", address)
            audit.record(node.db, "association-rejected", address=address[:64], detail="stow-rs: unknown token")
            metrics.stow_requests.labels("401").inc()
            return JSONResponse({"error": "a peer's stow_token is required (Authorization: Bearer)"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if peer.allowed_hosts and address not in peer.allowed_hosts:
            log.warning("STOW-RS from %s@%s refused: host not in its allowed_hosts", peer.ae_title, address)
            audit.record(node.db, "association-rejected", calling_ae=peer.ae_title[:16], address=address[:64],
                         detail=f"stow-rs: not from an allowed host ({address})")
            metrics.stow_requests.labels("403").inc()
            return JSONResponse({"error": f"peer {peer.name} may not upload from {address}"}, status_code=403)
        try:
            boundary = stow.boundary_of(request.headers.get("content-type", ""))
            length = int(request.headers.get("content-length") or 0)
            if length > stow.MAX_REQUEST_BYTES:
                raise stow.StowRequestError(413, f"request larger than {stow.MAX_REQUEST_BYTES} bytes")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > stow.MAX_REQUEST_BYTES:
                    raise stow.StowRequestError(413, f"request larger than {stow.MAX_REQUEST_BYTES} bytes")
            parts = stow.split_parts(bytes(body), boundary)
            if not parts:
                raise stow.StowRequestError(400, "no parts in the request")
        except stow.StowRequestError as exc:
            metrics.stow_requests.labels(str(exc.status)).inc()
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        study_uid = request.path_params.get("study")
        result = await run_in_threadpool(stow.store_parts, node, peer, address, parts, study_uid)
        metrics.stow_requests.labels(str(result.http_status)).inc()
        base = str(request.base_url).rstrip("/") + f"/dicomweb/studies/{study_uid}" if study_uid else ""
        return Response(json.dumps(result.response(base)), status_code=result.http_status,
                        media_type="application/dicom+json")

    routes = [
        Route("/", dashboard),
        Route("/fragments/dashboard", dashboard_live),
        Route("/series/{uid}", series_page),
        Route("/series/{uid}/{side}.png", thumbnail),
        Route("/jobs", jobs_page),
        Route("/jobs/{id:int}/retry", job_retry, methods=["POST"]),
        Route("/jobs/{id:int}/cancel", job_cancel, methods=["POST"]),
        Route("/rules", rules_page),
        Route("/peers", peers_page),
        Route("/peers/{name}/echo", peer_echo, methods=["POST"]),
        Route("/login", login_page),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/metrics", metrics_endpoint),
        Route("/healthz", healthz),
        Route("/dicomweb/studies", stow_rs, methods=["POST"]),
        Route("/dicomweb/studies/{study}", stow_rs, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(routes=routes)
