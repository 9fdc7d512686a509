"""Run the example FAQ bot, bare or wrapped by chatmw.

    python examples/faq_bot.py                  # wrapped, recording into chatmw-demo.db
    python examples/faq_bot.py --bare           # the same bot without chatmw
    python examples/faq_bot.py --db postgresql://postgres@127.0.0.1:5432/chatmw

The bot itself lives in ``chatmw/_demo/faq_bot.py`` so that ``chatmw demo`` can serve it
from any install. Its ``create_app`` is the part to copy into your own FastAPI bot:

    runtime = Runtime.from_settings(Settings(database_url=...))
    app.add_middleware(ChatMetricsMiddleware, recorder=runtime.recorder,
                       codec=JsonCodec(...), paths=["/chat"])
    mount_chatmw(app, runtime)               # routes under /metrics, started with the app
"""

from __future__ import annotations

import argparse

import uvicorn

from chatmw._demo.faq_bot import FAQ_CODEC, answer, create_app, create_bot

__all__ = ["FAQ_CODEC", "answer", "create_app", "create_bot", "main"]


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve the bot with uvicorn."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bare", action="store_true", help="serve the bot without chatmw")
    parser.add_argument("--db", default="sqlite:///chatmw-demo.db",
                        help="database URL of the wrapped bot (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    args = parser.parse_args(argv)
    app = create_app(wrapped=not args.bare, database_url=args.db)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
