"""The demo bot served by ``chatmw demo`` (shipped in the package so the command works
from any install); ``examples/faq_bot.py`` runs the same bot from a source checkout."""
