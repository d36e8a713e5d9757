"""The local scoring server: Azure ML's inference contract (routes, input modes, errors, headers) on Flask + gunicorn.

Modules, in the order a request meets them: `runner` (gunicorn, workers), `app` (routes and per-request checks),
`entry_script` (loading the script, input modes), `invoke` (calling run() with a deadline), `errors` (every error
and its status), `swagger`, and `settings` (every setting, declared once).
"""

__version__ = "0.1.0"
