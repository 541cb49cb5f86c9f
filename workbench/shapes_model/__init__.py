"""The shipped model: a small LLaVA trained from scratch on grounded synthetic scenes."""
