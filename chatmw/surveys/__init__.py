"""Post-chat CSAT and NPS surveys on the web widget, Messenger and WhatsApp.

The scheduler decides which conversations are due, the dispatcher sends each prompt once
through the channel's outbound interface, and the answer preprocessor turns replies into
scores in the writer's transaction. See ``docs/surveys.md``.
"""

from chatmw.surveys.addresses import capture_addresses, install_address_capture
from chatmw.surveys.answering import SurveyAnswerPreprocessor
from chatmw.surveys.answers import Answer, parse_answer
from chatmw.surveys.api import create_survey_router
from chatmw.surveys.config import SurveysConfig, SurveySettings, load_config, parse_config
from chatmw.surveys.dispatcher import Dispatcher, RoundStats
from chatmw.surveys.metrics import csat, nps
from chatmw.surveys.service import SurveyService, build_channels, install_answer_preprocessor
from chatmw.surveys.settings_store import ConfigSource
from chatmw.surveys.web import WebOutbound, fetch_web_messages

__all__ = [
    "Answer",
    "ConfigSource",
    "Dispatcher",
    "RoundStats",
    "SurveyAnswerPreprocessor",
    "SurveyService",
    "SurveySettings",
    "SurveysConfig",
    "WebOutbound",
    "build_channels",
    "capture_addresses",
    "create_survey_router",
    "csat",
    "fetch_web_messages",
    "install_address_capture",
    "install_answer_preprocessor",
    "load_config",
    "nps",
    "parse_answer",
    "parse_config",
]
