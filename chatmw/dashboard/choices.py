"""The values the dashboard offers in its channel and campaign filters."""

from __future__ import annotations

from sqlalchemy import Engine, select

from chatmw.store.models import Conversation, Touch

__all__ = ["filter_choices", "MAX_CHOICES"]

# The maximum number of values listed per filter. The filters accept any value typed into the URL.
MAX_CHOICES = 500


def filter_choices(engine: Engine) -> dict[str, list[str]]:
    """Return the stored channels and campaigns, sorted, at most :data:`MAX_CHOICES` each."""
    channels = (
        select(Conversation.channel).distinct().order_by(Conversation.channel).limit(MAX_CHOICES)
    )
    campaigns = (
        select(Touch.campaign)
        .where(Touch.campaign.is_not(None))
        .distinct()
        .order_by(Touch.campaign)
        .limit(MAX_CHOICES)
    )
    with engine.connect() as connection:
        return {
            "channels": list(connection.execute(channels).scalars()),
            "campaigns": [value for value in connection.execute(campaigns).scalars() if value],
        }
