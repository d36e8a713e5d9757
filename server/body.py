"""The request class of the app and of the model process: its body is the one the HTTP front read whole.

The front (connection.py) reads a request's whole body, bounded by `--max-body-bytes`, before the app sees it, and
hands it over as `wsgi.input`, a BytesIO over those very bytes, with WHOLE_BODY set. werkzeug would wrap that in a
LimitedStream that reads it in 64 KB pieces and joins them (two copies of every body, and again in the model
process); here `get_data()` is the body itself, not a copy. Anything else (an app used without the front) reads
the usual way.
"""

from __future__ import annotations

from typing import IO

import flask
from werkzeug.utils import cached_property

WHOLE_BODY = "scorehost.whole_body"  # set by whoever puts the whole body in wsgi.input


class WholeBodyRequest(flask.Request):
    @cached_property
    def stream(self) -> IO[bytes]:
        if self.environ.get(WHOLE_BODY):
            return self.environ["wsgi.input"]  # BytesIO(body).read() returns body itself, not a copy
        return super().stream
