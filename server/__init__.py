"""The local scoring server: Azure ML's inference contract (routes, input modes, errors, headers) on Flask + gunicorn.

A request's path, one line per hop:
  socket -> `front.FrontWorker` loop thread: accept, recv (one epoll loop per HTTP worker; gunicorn's master
            supervises the workers, `runner`)
  -> `connection.Connection`: bytes to a complete request (head checks, body budget); reading pauses
  -> an app thread (`front`): the request's scoring deadline starts
  -> `app` (Flask): request ids, key, body size -> `entry_script`: the input mode turns it into run()'s arguments
  -> `invoke`: run() under the deadline              (each worker calls run(), as Azure ML)
     or preprocess() under the deadline -> `model_process.ModelClient` -> `wire` frame over a Unix socket
        -> model process (`model_process.ModelServer`): queue, batch, run_batch() -> `wire` frame back
  -> `app.as_response` + contract headers -> the loop thread (one hand-off queue) -> `connection` writes it.
Errors are types (`errors`), mapped to statuses in one place; every setting is declared once (`settings`).
"""

__version__ = "0.1.0"
