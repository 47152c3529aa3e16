"""Serving-side pieces that need no Ray: OpenAI request/response models, prompt processing, the async engine loop."""
