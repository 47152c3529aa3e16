"""Ray Serve: the app builder, the OpenAI ingress and the LLMServer deployment."""
