"""The HTTP parts both servers share (``serve``'s OpenAI-compatible API and ``env serve``): the API-key and
body-limit guard with its error bodies (:mod:`.guard`) and the uvicorn runner, foreground or on a thread
(:mod:`.runner`). This package file imports nothing (FastAPI and uvicorn load only when a server starts)."""
