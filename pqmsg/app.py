"""The app factory: Quart-Trio routes behind the ASGI edge.

``create_app(services)`` wires blueprints to the opened services, renders
every :class:`~pqmsg.errors.ProblemError` and HTTP error as problem+json,
and turns anything unexpected into a bare 500 whose details go only to the
log. Exception groups from handler nurseries are handled with ``except*``
semantics: a group whose only leaves are one problem is that problem.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, cast

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from pqmsg.errors import HttpError, MethodNotAllowed, NotFound, PayloadTooLarge, ProblemError
from pqmsg.http.edge import REQUEST_ID_KEY, ROUTE_KEY, ASGIApp, Edge
from pqmsg.http.problems import PROBLEM_JSON, internal_error_body, problem_body
from pqmsg.routes import accounts, devices, keys, messages, ops, stream
from pqmsg.services import Services

log = logging.getLogger("pqmsg.app")
_RULE_PARAM = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


@functools.lru_cache(maxsize=256)  # one entry per route: the rules are fixed
def route_template(rule: str) -> str:
    """Quart's ``/v1/keys/<account>/<device>`` as ``/v1/keys/{account}/{device}``."""
    return _RULE_PARAM.sub(r"{\1}", rule)


def problem_response(error: ProblemError) -> Response:
    rid = str(request.scope.get(REQUEST_ID_KEY, "-"))
    response = Response(problem_body(error, rid), status=error.status, content_type=PROBLEM_JSON)
    for name, value in error.headers().items():
        response.headers[name] = value
    return response


def _from_http_exception(exc: HTTPException) -> ProblemError:
    code = exc.code or 500
    if code == 404:
        return NotFound("no such endpoint")
    if code == 405:
        return MethodNotAllowed(f"{request.method} is not allowed here")
    if code == 413:
        return PayloadTooLarge("the request body is larger than the server accepts")
    return HttpError(code, exc.name, exc.description or exc.name)


def _only_problem(group: BaseExceptionGroup[BaseException]) -> ProblemError | None:
    matched, rest = group.split(ProblemError)
    if rest is None and matched is not None:
        leaves = list(_leaves(matched))
        if len(leaves) == 1 and isinstance(leaves[0], ProblemError):
            return leaves[0]
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def create_app(svc: Services) -> Edge:
    """The ASGI application the server hands to Hypercorn."""
    app = QuartTrio("pqmsg")
    app.config.update(
        MAX_CONTENT_LENGTH=svc.settings.http.max_body_bytes,
        PROVIDE_AUTOMATIC_OPTIONS=False,
        JSON_SORT_KEYS=False,
        BODY_TIMEOUT=30,
        RESPONSE_TIMEOUT=svc.settings.messages.max_wait_s + 30,
    )
    for module in (ops, accounts, devices, keys, messages, stream):
        app.register_blueprint(module.blueprint(svc))

    @app.before_request
    async def record_route() -> None:
        rule = request.url_rule
        if rule is not None:
            scope = cast(dict[str, Any], request.scope)
            scope[ROUTE_KEY] = route_template(rule.rule)

    @app.errorhandler(ProblemError)
    async def on_problem(error: ProblemError) -> Response:
        return problem_response(error)

    @app.errorhandler(HTTPException)
    async def on_http(error: HTTPException) -> Response:
        return problem_response(_from_http_exception(error))

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        if isinstance(error, BaseExceptionGroup):
            problem = _only_problem(error)
            if problem is not None:
                return problem_response(problem)
        rid = str(request.scope.get(REQUEST_ID_KEY, "-"))
        log.error("unhandled error in %s %s (request %s)", request.method, request.path, rid, exc_info=error)
        return Response(internal_error_body(rid), status=500, content_type=PROBLEM_JSON)

    return Edge(cast(ASGIApp, app), in_flight=svc.in_flight, metrics=svc.metrics)
