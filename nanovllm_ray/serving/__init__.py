"""Serving-side pieces that need no Ray: OpenAI request/response models and prompt processing (tokenizer, chat
template, limits)."""
