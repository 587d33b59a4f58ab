"""The OpenAI-compatible HTTP server: protocol -> plan -> async engine -> chunks -> responder.

Open http://HOST:PORT/ for the playground. See app.py for the routes and error rules,
protocol.py for the accepted fields, chunks.py for the `blockdiff_*` extras in responses.
"""
