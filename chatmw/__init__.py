"""chatmw: chat metrics middleware for chatbots."""
