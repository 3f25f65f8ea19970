"""The OpenAI-compatible endpoint `kiln eval --endpoint` scores: reachable, and serving the model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from kiln.errors import EndpointError


def served_model(endpoint: str, name: str | None, timeout: float = 10.0) -> str:
    """The model name to request: `name` if the server lists it, else its only (first) model."""
    url = endpoint.rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            listed = [m["id"] for m in json.loads(response.read()).get("data", [])]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        raise EndpointError(f"endpoint {endpoint}: GET {url} failed ({getattr(exc, 'reason', exc)}): start the "
                            f"server (`kiln serve MODEL --port N`) or fix the URL; it is the base that "
                            f"/completions and /models hang under, e.g. http://127.0.0.1:8000/v1") from None
    if name is None:
        if not listed:
            raise EndpointError(f"endpoint {endpoint} lists no model at {url}: give endpoint_model=<name>")
        return listed[0]
    if listed and name not in listed:
        raise EndpointError(f"endpoint {endpoint} serves {', '.join(listed)}, not {name!r}: fix endpoint_model")
    return name
