"""Post-chat CSAT and NPS surveys on the web widget, Messenger and WhatsApp.

The scheduler decides which conversations are due, the dispatcher sends each prompt once
through the channel's outbound interface, and the answer preprocessor turns replies into
scores in the writer's transaction. See ``docs/surveys.md``.
"""

from chatmw._lazy import lazy_exports

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

# Each name is imported from its module on first use, so that importing one submodule
# (such as the survey-answer preprocessor) does not import the others (such as the FastAPI routes).
__getattr__ = lazy_exports(globals(), {
    "capture_addresses": "chatmw.surveys.addresses",
    "install_address_capture": "chatmw.surveys.addresses",
    "SurveyAnswerPreprocessor": "chatmw.surveys.answering",
    "Answer": "chatmw.surveys.answers",
    "parse_answer": "chatmw.surveys.answers",
    "create_survey_router": "chatmw.surveys.api",
    "SurveysConfig": "chatmw.surveys.config",
    "SurveySettings": "chatmw.surveys.config",
    "load_config": "chatmw.surveys.config",
    "parse_config": "chatmw.surveys.config",
    "Dispatcher": "chatmw.surveys.dispatcher",
    "RoundStats": "chatmw.surveys.dispatcher",
    "csat": "chatmw.surveys.metrics",
    "nps": "chatmw.surveys.metrics",
    "SurveyService": "chatmw.surveys.service",
    "build_channels": "chatmw.surveys.service",
    "install_answer_preprocessor": "chatmw.surveys.service",
    "ConfigSource": "chatmw.surveys.settings_store",
    "WebOutbound": "chatmw.surveys.web",
    "fetch_web_messages": "chatmw.surveys.web",
})
