"""The demo bot served by ``chatmw demo``.

It ships inside the package so that the command works from any install.
``examples/faq_bot.py`` runs the same bot from a source checkout.
"""
