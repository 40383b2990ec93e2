"""Generation servers: vLLM launcher and the embedded CPU backend, both behind the OpenAI API."""
