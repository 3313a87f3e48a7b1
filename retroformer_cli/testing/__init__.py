"""Scripted stand-ins for the LLM side, shipped for users as well as for our tests.

- :class:`~retroformer_cli.testing.fake_llm.FakeLLM`: an in-process client that replies from a script (a list, a
  function or a fixed reply). A plugin env's author can play episodes with it without a model.
- :class:`~retroformer_cli.testing.fake_openai_server.FakeOpenAIServer`: a real OpenAI-compatible HTTP server on
  127.0.0.1 (stdlib only) with injectable faults (429, 5xx, timeouts, dropped connections), to point
  ``--actor openai:...`` or one's own tools at a scripted endpoint: ``python -m
  retroformer_cli.testing.fake_openai_server --port 0 --delay 0.2``. The benchmarks use it as an endpoint
  with a fixed latency.

This package file imports nothing.
"""
